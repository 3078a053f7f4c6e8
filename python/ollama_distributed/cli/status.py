"""`status`: the node's health at a glance, as in the tutorial.

Exit codes: 0 healthy, 1 degraded (or unhealthy), 2 unreachable (nothing
answered, or what answered is not an ollama-distributed node).

`--json` prints one object with this stable schema (schema_version 1):

    schema_version  1
    api             the URL asked
    status          "healthy" | "degraded" | "unhealthy" | "unreachable"
    error           why, when status is "unreachable" (else absent)
    timestamp       the node's clock, ISO 8601 UTC
    node            {id, status, role, version, engine, uptime_seconds}
    cluster         {size, active_nodes, leader_id, peers_connected}
    summary         one sentence
    failed_tasks    {name: why} of background tasks that ended for good (only when any did)
  with --verbose, also:
    resources       {cpu_percent, cpu_count, memory_used_bytes, memory_total_bytes,
                     memory_percent, disk_used_bytes, disk_total_bytes, disk_percent}
    models          [{name, size, loaded, requests}]
    nodes           [{id, status, role, address, local}]
    services        {api|web|p2p: {url, port, protocol, connections} or null,
                     rpc: {enabled, ready, address, memory_mib, restarts, pid} or null,
                     rpc_tunnels: {open: [{port, peer, bytes_sent, bytes_received, connections,
                                   active, failures}], served: {rpc_port, streams, active, refused,
                                   bytes_in, bytes_out}} or null}
    split           [{name, parts: [{node, local, memory_mib, share_mib, layers}]}] of the
                    models this node runs split across nodes

With `--watch --json` one such object is printed per line (NDJSON).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

import click

from .client import ApiError, Client, checked_api, human_bytes, print_json, use_color
from .options import api_option, json_option

SCHEMA_VERSION = 1
EXIT = {"healthy": 0, "degraded": 1, "unhealthy": 1, "unreachable": 2}
RULE = "━" * 26


def _not_a_node(client: Client, path: str, what: str) -> ApiError:
    return ApiError(f"{client.base}{path} answered, but {what}: is --api pointing at an "
                    "ollama-distributed node's API port (default 8080)?", exit_code=2)


def _health_body(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "node_id" in data and "status" in data else None


def _get_dict(client: Client, path: str, timeout: float) -> dict[str, Any]:
    try:
        data = client.get(path, timeout=timeout)
    except ApiError as e:
        if e.status == 401:
            raise ApiError(f"{client.base}{path}: {e.message}", exit_code=2) from None
        if e.status == 503 and path == "/health":
            unhealthy = _health_body(e.message)  # an unhealthy node answers its health with 503
            if unhealthy is not None:
                return unhealthy
        if e.status is not None:
            raise _not_a_node(client, path, f"with HTTP {e.status} ({e.message[:80]})") from None
        raise
    if not isinstance(data, dict):
        raise _not_a_node(client, path, "not with a JSON object")
    return data


def collect(api: str, verbose: bool, timeout: float = 5.0) -> dict[str, Any]:
    """Everything `status` shows, in the --json schema. Raises ApiError when
    the node cannot be read."""
    client = Client(api, timeout=timeout)
    health = _get_dict(client, "/health", timeout)
    if not isinstance(health.get("node_id"), str) or health.get("status") not in EXIT:
        raise _not_a_node(client, "/health", "not with a node's health (no node_id and status)")
    st = _get_dict(client, "/api/distributed/status", timeout)
    raw_services = health.get("services")
    services: dict[str, Any] = raw_services if isinstance(raw_services, dict) else {}
    status = str(health["status"])
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "api": client.base,
        "status": status,
        "timestamp": health.get("timestamp"),
        "node": {
            "id": health["node_id"],
            "status": status,
            "role": st.get("role", "unknown"),
            "version": health.get("version"),
            "engine": services.get("engine"),
            "uptime_seconds": health.get("uptime_seconds", 0),
        },
        "cluster": {
            "size": st.get("cluster_size", 1),
            "active_nodes": st.get("active_nodes", []),
            "leader_id": st.get("leader_id"),
            "peers_connected": services.get("p2p_peers", 0),
        },
    }
    out["summary"] = ("All systems operational" if status == "healthy"
                      else f"The node reports itself {status}")
    failed = health.get("failed_tasks")
    if isinstance(failed, dict) and failed:
        out["failed_tasks"] = {str(k): str(v) for k, v in failed.items()}
        out["summary"] += ("; background task(s) ended: " + ", ".join(
            f"{k} ({v})" for k, v in out["failed_tasks"].items()) + "; systemd restarts it")
    if not verbose:
        return out
    nodes = _get_dict(client, "/api/distributed/nodes", timeout).get("nodes") or []
    me = next((n for n in nodes if isinstance(n, dict) and n.get("id") == health["node_id"]), {})
    r = me.get("resources") or {}
    out["resources"] = {
        "cpu_percent": r.get("cpu_percent", round(100 * r.get("cpu", 0), 1)),
        "cpu_count": r.get("cpu_count"),
        "memory_used_bytes": r.get("memory_used_bytes"),
        "memory_total_bytes": r.get("memory_total_bytes"),
        "memory_percent": round(100 * r.get("memory", 0), 1),
        "disk_used_bytes": r.get("disk_used_bytes"),
        "disk_total_bytes": r.get("disk_total_bytes"),
        "disk_percent": round(100 * r.get("disk", 0), 1),
    }
    out["nodes"] = [{"id": n.get("id"), "status": n.get("status"), "role": n.get("role"),
                     "address": n.get("address"), "local": n.get("id") == health["node_id"]}
                    for n in nodes if isinstance(n, dict)]
    models = _get_dict(client, "/api/distributed/models", timeout).get("models") or []
    out["models"] = [
        {"name": m.get("name"), "size": m.get("size", 0),
         "loaded": health["node_id"] in (m.get("loaded_on") or []), "requests": m.get("requests", 0)}
        for m in models if isinstance(m, dict)
    ]
    out["services"] = st.get("services") or {}
    # models split across nodes (issue 16): which node holds which share
    running = _get_dict(client, "/api/ps", timeout).get("models") or []
    out["split"] = [{"name": m.get("name"), "parts": m["parts"]} for m in running
                    if isinstance(m, dict) and isinstance(m.get("parts"), list)]
    return out


def _uptime(seconds: float) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 60 else f"0h 0m {s}s"


def render(data: dict[str, Any], color: bool) -> str:
    def paint(text: str, fg: str) -> str:
        return click.style(text, fg=fg, bold=True) if color else text

    status = data["status"]
    mark = {"healthy": "✅", "degraded": "⚠️ ", "unhealthy": "❌"}.get(status, "❌")
    fg = {"healthy": "green", "degraded": "yellow"}.get(status, "red")
    ts = data.get("timestamp") or ""
    try:
        shown = datetime.fromisoformat(ts).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        shown = ts
    n = data["node"]
    c = data["cluster"]
    lines = [
        "ollama-distributed Cluster Status", RULE,
        f"{mark} Overall Status: {paint(status, fg)}",
        f"Timestamp: {shown}",
        "",
        "📦 Node Information",
        f"   ID: {n['id']}",
        f"   Status: {paint(n['status'], fg)}",
        f"   Role: {n['role']}",
        f"   Uptime: {_uptime(n['uptime_seconds'])}",
        f"   Version: {n.get('version')}  Engine: {n.get('engine')}",
        (f"   Cluster: {c['size']} node(s), {len(c['active_nodes'])} active, "
        f"{c['peers_connected']} peer(s) connected"),
    ]
    if "resources" in data:
        r = data["resources"]
        lines += [
            "",
            "💾 Resource Usage",
            f"   CPU: {r['cpu_percent']:.1f}% ({r['cpu_count']} cores)",
            (f"   Memory: {r['memory_percent']:.1f}% ({human_bytes(r['memory_used_bytes'] or 0)} / "
            f"{human_bytes(r['memory_total_bytes'] or 0)})"),
            (f"   Disk: {r['disk_percent']:.1f}% ({human_bytes(r['disk_used_bytes'] or 0)} / "
            f"{human_bytes(r['disk_total_bytes'] or 0)}) for the data dir"),
            "",
            "🤖 Model Information",
            f"   Total Models: {len(data['models'])}",
            f"   Loaded Models: {sum(1 for m in data['models'] if m['loaded'])}",
        ]
        if data["models"]:
            lines.append("   Models:")
            for m in data["models"]:
                icon = "🟢" if m["loaded"] else "📦"
                state = "loaded" if m["loaded"] else "not loaded"
                lines.append(f"     {icon} {m['name']} ({human_bytes(m['size'] or 0)}, {state}) - "
                             f"{m['requests']} requests")
        for sm in data.get("split") or []:
            shares = ", ".join(f"{p.get('node')} {p.get('layers')} layers ({p.get('share_mib')} MiB)"
                               for p in sm["parts"] if isinstance(p, dict))
            lines.append(f"     ✂️  {sm['name']} split across nodes: {shares}")
        lines += ["", "🖧  Cluster Nodes"]
        for cn in data.get("nodes") or []:
            here = " (this node)" if cn["local"] else ""
            lines.append(f"   {'🟢' if cn['status'] == 'active' else '🔴'} {cn['id']}{here}: {cn['status']}, "
                         f"{cn['role']}, {cn['address'] or '-'}")
        lines += ["", "🌐 Network Services"]
        for key, label in (("api", "API"), ("web", "Web"), ("p2p", "P2P")):
            s = (data.get("services") or {}).get(key)
            if s:
                lines.append(f"   {label}: listening on :{s['port']}/{s['protocol']} ({s['url']}), "
                             f"{s['connections']} connection(s)")
            else:
                lines.append(f"   {label}: not running")
        rpc = (data.get("services") or {}).get("rpc")
        if isinstance(rpc, dict):  # only when engine.rpc_server is on
            state = "serving" if rpc.get("ready") else "not serving yet"
            lines.append(f"   RPC: {state} on {rpc.get('address')} (loopback only), "
                         f"{rpc.get('memory_mib')} MiB offered")
    lines += ["", "📊 Quick Summary", RULE]
    if status == "healthy":
        lines += ["✅ All systems operational", "🚀 Ready to serve AI models"]
    else:
        lines += [f"{mark} {data['summary']}", "   Run `ollama-distributed troubleshoot` for details."]
    return "\n".join(lines)


def _once(api: str, verbose: bool, as_json: bool, color: bool) -> int:
    try:
        data = collect(api, verbose)
    except ApiError as e:
        if as_json:
            print_json({"schema_version": SCHEMA_VERSION, "api": Client(api).base,
                        "status": "unreachable", "error": e.message})
        else:
            click.echo(("❌ " if not color else click.style("❌ ", fg="red")) + e.message, err=True)
        return e.exit_code if e.exit_code in (1, 2) else 2
    if as_json:
        print_json(data)
    else:
        click.echo(render(data, color))
    return EXIT[data["status"]]


@click.command()
@api_option
@click.option("--verbose", "-v", is_flag=True, help="Add resources, models and network services.")
@click.option("--watch", "-w", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=5.0, show_default=True,
              metavar="S", help="Seconds between refreshes with --watch.")
@json_option
def status(api: str, verbose: bool, watch: bool, interval: float, as_json: bool) -> None:
    """Show the node's health. Exit 0 healthy, 1 degraded, 2 unreachable."""
    color = use_color()
    try:
        api = checked_api(api)
    except ApiError as e:
        if as_json:
            print_json({"schema_version": SCHEMA_VERSION, "api": api, "status": "unreachable",
                        "error": e.message})
        else:
            click.echo(f"❌ {e.message}", err=True)
        sys.exit(2)
    if not watch:
        sys.exit(_once(api, verbose, as_json, color))
    tty = sys.stdout.isatty()
    try:
        while True:
            if tty and not as_json:
                click.echo("\x1b[H\x1b[2J", nl=False)  # home and clear: redraw in place
            if as_json:
                try:
                    data = collect(api, verbose)
                except ApiError as e:
                    data = {"schema_version": SCHEMA_VERSION, "api": Client(api).base,
                            "status": "unreachable", "error": e.message}
                click.echo(json.dumps(data))
            else:
                _once(api, verbose, False, color)
                click.echo(f"\n(refreshing every {interval:g}s; Ctrl-C to stop)")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if not as_json:
            click.echo()
        sys.exit(0)  # stopping a watch is not a failure
