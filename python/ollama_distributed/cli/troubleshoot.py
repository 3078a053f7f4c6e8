"""`troubleshoot`: real checks of a node and its host, each with its fix.

Every check reads the actual state (the node's API, the kernel's sockets, the
file system, the cgroup's memory limit, the model blobs' sha256, the peers'
clocks). A line is ✅ pass, ❌ fail (with `Fix:`) or ➖ skipped (when an earlier
failure makes it meaningless). Exit 0 only when nothing failed, else 1.

`--json` prints {"ok", "api", "checks": [{"name", "status", "detail", "fix"}]}
with status "pass" | "fail" | "skip".
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import psutil

from .. import config as cfgmod
from ..config import Config
from ..errors import ConfigError
from .client import KEY_HINT, ApiError, Client, checked_api, human_bytes, print_json, use_color
from .options import api_option, json_option

# A pull or an upload needs room for a whole model; 1 GiB holds the default
# model ten times over and a small quantised 1B model.
MIN_FREE_DISK = 1 << 30
# Loading a GGUF maps the file and adds KV cache and scratch buffers: the
# default model (98 MB) runs in about 230 MB RSS, so ask for 1.3x the largest
# model and never less than 512 MiB.
MIN_FREE_MEMORY = 512 << 20
MODEL_MEMORY_FACTOR = 1.3
# Adverts and liveness carry wall-clock milliseconds and a peer is stale after
# scheduler.stale_after_ms (3 s by default): skew near that marks live peers
# stale, so flag anything above 2 s.
MAX_CLOCK_SKEW = 2.0
PEER_TIMEOUT = 3.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "", "::"}


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str
    fix: str = ""


def passed(name: str, detail: str) -> Check:
    return Check(name, "pass", detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, "fail", detail, fix)


def skipped(name: str, detail: str) -> Check:
    return Check(name, "skip", detail)


@dataclass
class Context:
    api: str
    client: Client
    cfg: Config
    config_error: str | None
    config_file: str | None
    data_dir: Path
    health: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    nodes: list[dict[str, Any]] | None = None
    node_error: str = ""

    @property
    def node_is_local(self) -> bool:
        return (urlsplit(self.client.base).hostname or "") in LOCAL_HOSTS


# ---- checks ---------------------------------------------------------------------------


def check_service(ctx: Context) -> list[Check]:
    name = "Service reachable"
    try:
        health = ctx.client.get("/health", timeout=PEER_TIMEOUT)
    except ApiError as e:
        ctx.node_error = e.message
        if e.status is None:
            reason = e.message.split(f"{ctx.client.base}: ", 1)[-1].split(". Is it running")[0]
            return [failed(name, f"nothing answers at {ctx.client.base}: {reason}",
                           "start the node: `systemctl start ollama-distributed` (or `ollama-distributed "
                           "start`), or point --api / $OLLAMA_DISTRIBUTED_API at a running node")]
        if e.status == 503:
            from .status import _health_body

            sick = _health_body(e.message)
            if sick is not None:
                return [failed(name, f"node {sick['node_id']} answers at {ctx.client.base} but is "
                                     f"{sick['status']}",
                               "read the node's log (`journalctl -u ollama-distributed -e`) for why")]
        if e.status == 401:
            return [failed(name, f"{ctx.client.base} refuses us: {e.message}", f"export {KEY_HINT}")]
        return [failed(name, f"{ctx.client.base}/health answered HTTP {e.status}, not a node's health",
                       "point --api at the node's API port (api.port, default 8080), not another server")]
    if not isinstance(health, dict) or not isinstance(health.get("node_id"), str):
        ctx.node_error = "not an ollama-distributed node"
        return [failed(name, f"{ctx.client.base}/health answered JSON that is not a node's health",
                       "point --api at the node's API port (api.port, default 8080), not another server")]
    ctx.health = health
    try:
        st = ctx.client.get("/api/distributed/status", timeout=PEER_TIMEOUT)
        ctx.status = st if isinstance(st, dict) else None
    except ApiError as e:
        if e.status == 401:  # /health is open to probes; the rest needs a key
            ctx.node_error = e.message
            return [failed(name, f"{ctx.client.base} answers /health but refuses the rest without an API key",
                           f"export {KEY_HINT}")]
    with contextlib.suppress(ApiError):
        nodes = ctx.client.get("/api/distributed/nodes", timeout=PEER_TIMEOUT)
        if isinstance(nodes, dict) and isinstance(nodes.get("nodes"), list):
            ctx.nodes = [n for n in nodes["nodes"] if isinstance(n, dict)]
    state = health.get("status")
    detail = f"node {health['node_id']} answers at {ctx.client.base} ({state})"
    if state != "healthy":
        return [failed(name, detail, "read the node's log (`journalctl -u ollama-distributed -e`) for "
                                     "why it is not healthy")]
    return [passed(name, detail)]


def _holder(port: int, proto: str) -> str:
    """Who holds a local port, from the kernel's socket table."""
    kind = "tcp" if proto == "tcp" else "udp"
    try:
        conns = psutil.net_connections(kind=kind)
    except (psutil.Error, OSError):
        return "another process"
    for c in conns:
        if not c.laddr or c.laddr.port != port:
            continue
        if proto == "tcp" and c.status != psutil.CONN_LISTEN:
            continue
        if c.pid:
            try:
                p = psutil.Process(c.pid)
                cmd = " ".join(p.cmdline()) or p.name()
            except psutil.Error:
                cmd = "?"
            return f"pid {c.pid} ({cmd[:80]})"
        return "another process"
    return "another process"


def _port_free(host: str, port: int, proto: str) -> bool:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(fam, kind) as s:
        if proto == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node binds
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _answers_as(url: str, path: str, node_id: str) -> bool:
    try:
        data = Client(url, timeout=PEER_TIMEOUT).get(path)
    except ApiError:
        return False
    if not isinstance(data, dict):
        return False
    health = data.get("health") if path == "/api/state" else data
    return isinstance(health, dict) and health.get("node_id") == node_id


def check_ports(ctx: Context) -> list[Check]:
    cfg = ctx.cfg
    where = ctx.config_file or "the config file"
    if ctx.health is not None:
        if not ctx.node_is_local:
            return [skipped("Ports", f"the node at {ctx.client.base} is on another host; run troubleshoot "
                                     "there to check its ports")]
        node_id = ctx.health["node_id"]
        out = []
        services = (ctx.status or {}).get("services") or {}
        for key, label in (("api", "API"), ("web", "web")):
            s = services.get(key)
            if not s:
                continue
            name = f"Port {s['port']}/tcp ({label})"
            path = "/health" if key == "api" else "/api/state"
            if _answers_as(s["url"].replace("localhost", "127.0.0.1"), path, node_id):
                out.append(passed(name, f"ours: node {node_id} answers on it"))
            else:
                out.append(failed(name, f"the node says it serves {s['url']}, but it does not answer as "
                                        f"{node_id}; held by {_holder(s['port'], 'tcp')}",
                                  f"stop that process or set {key}.port in {where}, then restart the node"))
        p2p = services.get("p2p")
        if p2p:
            name = f"Port {p2p['port']}/udp (P2P)"
            if _port_free("0.0.0.0", int(p2p["port"]), "udp"):
                out.append(failed(name, "the node says it listens there, but nothing holds the port",
                                  "restart the node and read its log for the P2P listener's error"))
            else:
                out.append(passed(name, f"held: the node's QUIC endpoint ({p2p['url']})"))
        return out or [skipped("Ports", "the node did not say which ports it uses")]
    # Nothing answers: the ports the config asks for must be free for a start.
    wanted = [("API", "api.port", "--api-port", cfg.api.host, cfg.api.port, "tcp")]
    if cfg.web.enabled:
        wanted.append(("web", "web.port", "--web-port", cfg.web.host, cfg.web.port, "tcp"))
    if cfg.p2p.enabled:
        wanted.append(("P2P", "p2p.port", "--p2p-port", cfg.p2p.host, cfg.p2p.port, "udp"))
    out = []
    for label, key, flag, host, port, proto in wanted:
        name = f"Port {port}/{proto} ({label})"
        try:
            free = _port_free(host, port, proto)
        except OSError as e:
            out.append(failed(name, f"cannot bind {host}:{port}: {e.strerror}",
                              f"set {key.split('.')[0]}.host in {where} to an address of this host"))
            continue
        if free:
            out.append(passed(name, f"free on {host or '0.0.0.0'}"))
        else:
            holder = _holder(port, proto)
            out.append(failed(name, f"in use by {holder}, and no node answers at {ctx.client.base}",
                              f"stop that process, or set {key} in {where} (or start with {flag} N)"))
    return out


def check_disk(ctx: Context) -> list[Check]:
    name = "Disk space"
    d = ctx.data_dir
    probe = d
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        du = psutil.disk_usage(str(probe))
    except OSError as e:
        return [failed(name, f"cannot read the disk usage of {probe}: {e.strerror}",
                       "set node.data_dir (or --data-dir) to a folder on a mounted disk")]
    detail = f"{human_bytes(du.free)} free of {human_bytes(du.total)} for the data dir {d}"
    if du.free < MIN_FREE_DISK:
        return [failed(name, detail + f" (under {human_bytes(MIN_FREE_DISK)})",
                       f"free space on the file system of {probe}, or move node.data_dir to a larger disk")]
    if not os.access(probe, os.W_OK):
        if os.geteuid() != 0 and probe.stat().st_uid != os.geteuid():
            # The node's own user owns it (under systemd); only root can judge for it.
            return [passed(name, detail + f" (owned by uid {probe.stat().st_uid}; run as root to check "
                                          "that it is writable)")]
        return [failed(name, f"{probe} is not writable",
                       f"fix its owner (`chown -R ollama-distributed {probe}`), remount it read-write, "
                       "or set node.data_dir")]
    return [passed(name, detail)]


def cgroup_memory_available() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None."""
    best: int | None = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_f, usage_f = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_f, usage_f = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        p = base / path.lstrip("/")
        while True:  # the tightest limit on the way up counts
            with contextlib.suppress(OSError, ValueError):
                raw = (p / limit_f).read_text().strip()
                if raw != "max" and int(raw) < (1 << 60):
                    left = int(raw) - int((p / usage_f).read_text().strip())
                    best = left if best is None else min(best, left)
            if p == base or p == p.parent:
                break
            p = p.parent
    return best


def _largest_model(data_dir: Path) -> tuple[str, int]:
    from ..models.store import Store

    store = Store(data_dir / "models")
    biggest = ("", 0)
    with contextlib.suppress(Exception):
        for rec in store.records():
            if rec.size > biggest[1]:
                biggest = (rec.name.short, rec.size)
    return biggest


def check_memory(ctx: Context) -> list[Check]:
    name = "Memory"
    vm = psutil.virtual_memory()
    available, where = vm.available, "the host"
    limited = cgroup_memory_available()
    if limited is not None and limited < available:
        available, where = max(limited, 0), "this cgroup's memory limit"
    model, size = _largest_model(ctx.data_dir)
    need = max(MIN_FREE_MEMORY, int(size * MODEL_MEMORY_FACTOR))
    detail = f"{human_bytes(available)} available under {where}"
    why = f"{model} needs about {human_bytes(need)}" if model and need > MIN_FREE_MEMORY else \
        f"a node wants at least {human_bytes(need)}"
    if available < need:
        return [failed(name, f"{detail}; {why}",
                       "stop other memory users, lower engine.max_loaded_models, or raise the service's "
                       "MemoryMax= (systemctl edit ollama-distributed)")]
    return [passed(name, f"{detail}; {why}")]


def check_config(ctx: Context) -> list[Check]:
    name = "Configuration"
    if ctx.config_error:
        file = ctx.config_file or "the config file"
        return [failed(name, ctx.config_error,
                       f"edit {file}: fix or remove the key named above (`ollama-distributed config "
                       "validate` re-checks it; `config init --path NEW` writes every key at its default)")]
    return [passed(name, f"valid ({ctx.cfg.source})")]


def check_engine(ctx: Context) -> list[Check]:
    kind = ((ctx.health or {}).get("services") or {}).get("engine") or ctx.cfg.engine.kind
    out = []
    try:
        importlib.import_module("ollama_distributed._core")
        out.append(passed("Rust core", "ollama_distributed._core imports"))
    except Exception as e:
        out.append(failed("Rust core", f"ollama_distributed._core does not import: {e}",
                          "reinstall the package (`apt install --reinstall ollama-distributed`, or "
                          "`make dev` in a checkout)"))
    name = f"Engine ({kind})"
    if kind in ("llamacpp",):
        try:
            mod = importlib.import_module("llama_cpp")
            out.append(passed(name, f"llama_cpp {getattr(mod, '__version__', '?')} imports"))
        except Exception as e:
            out.append(failed(name, f"llama_cpp does not import: {type(e).__name__}: {e}",
                              "reinstall llama-cpp-python (`make venv`; CMAKE_ARGS=-DGGML_NATIVE=OFF for "
                              "a portable build), or choose another engine.kind"))
    elif kind in ("ollama", "openai"):
        upstream = ctx.cfg.engine.upstream
        if not upstream:
            out.append(failed(name, "engine.upstream is not set",
                              "set engine.upstream (or --upstream URL) to the upstream server"))
        else:
            path = "/api/version" if kind == "ollama" else "/v1/models"
            try:
                Client(upstream, timeout=PEER_TIMEOUT).get(path)
                out.append(passed(name, f"upstream {upstream} answers {path}"))
            except ApiError as e:
                out.append(failed(name, f"upstream {upstream}: {e.message[:160]}",
                                  "start the upstream server or fix engine.upstream"))
    else:
        out.append(passed(name, "built in"))
    return out


def check_models(ctx: Context) -> list[Check]:
    from ..models.store import Store

    name = "Model files"
    store = Store(ctx.data_dir / "models")
    if not store.manifests.is_dir():
        return [passed(name, f"no model store yet in {ctx.data_dir} (the node creates it on start)")]
    try:
        refs = store.referenced()
        problems = store.verify()
    except OSError as e:
        fix = ("run troubleshoot as root (or as the node's user: `sudo -u ollama-distributed ...`)"
               if isinstance(e, PermissionError) and os.geteuid() != 0
               else "fix the data dir's permissions (it belongs to the node's user)")
        return [failed(name, f"cannot read the model store {store.root}: {e.strerror}", fix)]
    if not problems:
        return [passed(name, f"{len(refs)} blob(s) in {store.root} match their sha256")]
    users: dict[str, list[str]] = {}
    for n in store.names():
        with contextlib.suppress(Exception):
            rec = store.get(n.short)
            for layer in [rec.manifest.get("config") or {}, *rec.manifest.get("layers", [])]:
                digest = str(layer.get("digest", "")).removeprefix("sha256:")
                users.setdefault(digest, []).append(n.short)
    out = []
    for digest, problem in problems:
        models = ", ".join(sorted(set(users.get(digest, [])))) or "no model"
        blob = store.blob_path(digest)
        out.append(failed(f"Model blob sha256:{digest[:12]}", f"{problem}: {blob} (used by {models})",
                          f"delete it (`rm {blob}`) and pull or create {models} again; the default "
                          "model comes back on the next start"))
    return out


def _peer_list(ctx: Context) -> list[dict[str, Any]]:
    me = (ctx.health or {}).get("node_id")
    return [n for n in ctx.nodes or [] if n.get("id") != me and not n.get("local")]


def _clock(url: str) -> tuple[float, float]:
    """(skew in seconds, round trip) between this host and the node at url."""
    t0 = time.time()
    health = Client(url, timeout=PEER_TIMEOUT).get("/health")
    t1 = time.time()
    if not isinstance(health, dict) or "timestamp" not in health:
        raise ApiError(f"{url}/health has no timestamp")
    try:
        ts = datetime.fromisoformat(str(health["timestamp"])).timestamp()
    except ValueError:
        raise ApiError(f"{url}/health has an unreadable timestamp {health['timestamp']!r}") from None
    return ts - (t0 + t1) / 2, t1 - t0


def check_peers(ctx: Context) -> list[Check]:
    if ctx.health is None:
        return [skipped("Peers", "the node is not reachable")]
    peers = _peer_list(ctx)
    if not peers:
        return [passed("Peers", "none: a single-node cluster")]
    out = []
    for p in peers:
        name = f"Peer {p.get('id')}"
        addr = p.get("api_address") or p.get("address") or ""
        if not addr:
            out.append(failed(name, "no API address advertised", "restart that node so it advertises"))
            continue
        try:
            Client(addr, timeout=PEER_TIMEOUT).get("/health/live")
        except ApiError as e:
            reason = "unreachable" if e.status is None else f"HTTP {e.status}"
            out.append(failed(name, f"{addr} {reason} (cluster says {p.get('status')})",
                              f"check that node runs (`ollama-distributed status --api {addr}`) and that "
                              "TCP to its API port and UDP to its P2P port (4001) pass between the hosts"))
            continue
        if p.get("status") != "active":
            out.append(failed(name, f"{addr} answers, but the cluster marks it {p.get('status')}",
                              "check UDP to its P2P port (default 4001) between the hosts"))
        else:
            out.append(passed(name, f"{addr} answers"))
    return out


def check_clock(ctx: Context) -> list[Check]:
    if ctx.health is None:
        return [skipped("Clock skew", "the node is not reachable")]
    targets = [(ctx.health["node_id"], ctx.client.base)]
    targets += [(str(p.get("id")), p.get("api_address") or "") for p in _peer_list(ctx)]
    out = []
    fix = ("turn on time sync on both hosts (`timedatectl set-ntp true`, chrony or "
           "systemd-timesyncd) and check `timedatectl status`")
    for node_id, url in targets:
        name = f"Clock skew with {node_id}"
        if not url:
            continue
        try:
            skew, rtt = _clock(url)
        except ApiError as e:
            out.append(skipped(name, f"cannot read its clock: {e.message[:120]}"))
            continue
        detail = f"{skew:+.3f}s (round trip {rtt * 1000:.0f} ms)"
        if abs(skew) > MAX_CLOCK_SKEW + rtt / 2:
            out.append(failed(name, f"{detail}, over {MAX_CLOCK_SKEW:g}s", fix))
        else:
            out.append(passed(name, detail))
    return out


CHECKS = [check_service, check_ports, check_disk, check_memory, check_config, check_engine,
          check_models, check_peers, check_clock]


def build_context(api: str, config_path: str | None, data_dir: str | None) -> Context:
    config_error = None
    config_file: str | None = None
    try:
        found = cfgmod.find_config_file(config_path)
        config_file = str(found) if found else None
        cfg = cfgmod.load(config_path)
    except ConfigError as e:
        config_error = str(e)
        cfg = Config()
        if config_path:
            config_file = config_path
    ctx = Context(api=api, client=Client(api, timeout=PEER_TIMEOUT), cfg=cfg,
                  config_error=config_error, config_file=config_file, data_dir=cfg.data_dir())
    if data_dir:
        ctx.data_dir = Path(data_dir).expanduser()
    return ctx


def run_checks(ctx: Context, explicit_data_dir: bool) -> list[Check]:
    results: list[Check] = []
    for check in CHECKS:
        if check is check_disk and not explicit_data_dir and ctx.status and ctx.node_is_local:
            # The running node knows its data dir best.
            ctx.data_dir = Path(ctx.status.get("data_dir") or ctx.data_dir)
        try:
            results += check(ctx)
        except Exception as e:
            results.append(failed(check.__name__.removeprefix("check_").title(),
                                  f"the check itself failed: {type(e).__name__}: {e}",
                                  "report this as a bug, with the line above"))
    return results


def render(results: list[Check], color: bool) -> str:
    marks = {"pass": "✅", "fail": "❌", "skip": "➖"}
    lines = ["🔧 ollama-distributed Troubleshooting", "━" * 36, "Diagnosing common issues...", ""]
    for c in results:
        head = f"{marks[c.status]} {c.name}: {c.detail}"
        if color and c.status == "fail":
            head = click.style(head, fg="red")
        lines.append(head)
        if c.fix:
            lines.append(f"   Fix: {c.fix}")
    bad = sum(1 for c in results if c.status == "fail")
    lines.append("")
    if bad:
        msg = f"❌ {bad} problem(s) found; each ❌ line above says how to fix it."
        lines.append(click.style(msg, fg="red", bold=True) if color else msg)
    else:
        msg = "✅ No issues detected!"
        lines.append(click.style(msg, fg="green", bold=True) if color else msg)
        lines.append("Your ollama-distributed installation looks healthy.")
    return "\n".join(lines)


@click.command()
@api_option
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config file to check (default: the one the node would use).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Data dir to check (default: the running node's, else the config's).")
@json_option
def troubleshoot(api: str, config_path: str | None, data_dir: str | None, as_json: bool) -> None:
    """Run real checks on the node and this host; each failure says its fix.
    Exit 0 only when every check passes."""
    ctx = build_context(checked_api(api), config_path, data_dir)
    results = run_checks(ctx, explicit_data_dir=bool(data_dir))
    ok = not any(c.status == "fail" for c in results)
    if as_json:
        print_json({"ok": ok, "api": ctx.client.base, "data_dir": str(ctx.data_dir),
                    "checks": [asdict(c) for c in results]})
    else:
        click.echo(render(results, use_color()))
    sys.exit(0 if ok else 1)
