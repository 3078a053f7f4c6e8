"""`troubleshoot`: every check passes on a healthy node, and each one fails for
real when its subject is broken (a corrupted blob, a held port, a bad config, a
full disk, a memory limit, a broken engine build, a dead peer, a skewed clock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed.models import names
from ollama_distributed.models.store import Store, layer

from ..conftest import CLI, NodeProc, free_port
from ..fakehttp import node_routes, serve


def troubleshoot(*args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> tuple[int, dict[str, Any], str]:
    """Run it twice: as text (returned) and as --json (parsed); both must agree."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
    text = subprocess.run([*(prefix or []), *CLI, "troubleshoot", *args], check=False, capture_output=True, text=True,
                          timeout=120, env=full_env)
    js = subprocess.run([*(prefix or []), *CLI, "troubleshoot", "--json", *args], check=False, capture_output=True,
                        text=True, timeout=120, env=full_env)
    assert "Traceback" not in text.stdout + text.stderr + js.stderr, text.stdout + text.stderr
    data = json.loads(js.stdout)
    assert js.returncode == text.returncode
    assert data["ok"] == (text.returncode == 0)
    return text.returncode, data, text.stdout


def by_status(data: dict[str, Any], status: str) -> list[dict[str, Any]]:
    return [c for c in data["checks"] if c["status"] == status]


def only_failure(data: dict[str, Any], name_part: str) -> dict[str, Any]:
    bad = by_status(data, "fail")
    assert [c["name"] for c in bad if name_part in c["name"]], data["checks"]
    assert all(name_part in c["name"] for c in bad), bad
    return bad[0]


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An empty HOME so no user config is found."""
    h = tmp_path / "home"
    h.mkdir()
    return {"HOME": str(h)}


def test_healthy_node_passes_every_check(node: NodeProc, home: dict[str, str]) -> None:
    code, data, text = troubleshoot("--api", node.url, env=home)
    assert code == 0, text
    names_ = [c["name"] for c in data["checks"]]
    for expected in ("Service reachable", f"Port {node.api_port}/tcp (API)", f"Port {node.web_port}/tcp (web)",
                     "Disk space", "Memory", "Configuration", "Rust core", "Engine (llamacpp)", "Model files",
                     "Peers"):
        assert expected in names_, (expected, names_)
    assert any(n.startswith("Clock skew with node-") for n in names_)
    assert data["data_dir"] == str(node.data_dir)  # the running node's, as it told us
    models = next(c for c in data["checks"] if c["name"] == "Model files")
    assert "match their sha256" in models["detail"]
    assert "No issues detected" in text and "❌" not in text


def test_corrupted_blob_is_found_with_its_fix(node: NodeProc, tmp_path: Path, home: dict[str, str]) -> None:
    store = Store(tmp_path / "data" / "models")
    store.ensure()
    digest, size = store.put_bytes(b"GGUF" + os.urandom(4096))
    store.write_manifest(names.parse("tiny:corrupt"),
                         [layer("application/vnd.ollama.image.model", digest, size)], {"model_format": "gguf"})
    code, data, _ = troubleshoot("--api", node.url, "--data-dir", str(tmp_path / "data"), env=home)
    assert code == 0, data  # intact first
    blob = store.blob_path(digest)
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 0xFF
    blob.write_bytes(bytes(raw))
    code, data, text = troubleshoot("--api", node.url, "--data-dir", str(tmp_path / "data"), env=home)
    assert code == 1
    bad = only_failure(data, "Model blob")
    assert "sha256 mismatch" in bad["detail"] and "tiny:corrupt" in bad["detail"]
    assert f"rm {blob}" in bad["fix"]
    assert f"❌ Model blob sha256:{digest[:12]}" in text and "Fix: delete it" in text
    blob.unlink()
    code, data, _ = troubleshoot("--api", node.url, "--data-dir", str(tmp_path / "data"), env=home)
    assert "missing" in only_failure(data, "Model blob")["detail"]


def write_config(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_port_held_by_another_process(tmp_path: Path, home: dict[str, str]) -> None:
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket, sys, time
        s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
        print("ready", flush=True); time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        cfg = write_config(tmp_path / "c.yaml", f"""
            api: {{port: {port}}}
            web: {{port: {free_port()}}}
            p2p: {{port: {free_port()}}}
            node: {{data_dir: {tmp_path / "data"}}}
        """)
        code, data, _text = troubleshoot("--api", f"http://127.0.0.1:{port}", "--config", str(cfg), env=home)
        assert code == 1
        port_check = next(c for c in data["checks"] if c["name"] == f"Port {port}/tcp (API)")
        assert port_check["status"] == "fail"
        assert f"pid {holder.pid}" in port_check["detail"] and "socket" in port_check["detail"]
        assert "api.port" in port_check["fix"] and str(cfg) in port_check["fix"]
        assert "--api-port" in port_check["fix"]
        others = [c for c in data["checks"] if c["name"].startswith("Port") and c is not port_check]
        assert others and all(c["status"] == "pass" for c in others), others
    finally:
        holder.kill()
        holder.wait()


def test_bad_config_names_the_key(tmp_path: Path, home: dict[str, str]) -> None:
    cfg = write_config(tmp_path / "bad.yaml", """
        api:
          prot: 8080
    """)
    code, data, _text = troubleshoot("--api", f"http://127.0.0.1:{free_port()}", "--config", str(cfg),
                                    "--data-dir", str(tmp_path / "d"), env=home)
    assert code == 1
    c = next(c for c in data["checks"] if c["name"] == "Configuration")
    assert c["status"] == "fail" and "api.prot" in c["detail"] and str(cfg) in c["detail"]
    assert f"edit {cfg}" in c["fix"]
    wrong_type = write_config(tmp_path / "type.yaml", "engine: {num_parallel: many}\n")
    _, data, _ = troubleshoot("--api", f"http://127.0.0.1:{free_port()}", "--config", str(wrong_type),
                              "--data-dir", str(tmp_path / "d"), env=home)
    c = next(c for c in data["checks"] if c["name"] == "Configuration")
    assert c["status"] == "fail" and "engine.num_parallel" in c["detail"]


def test_full_disk(node: NodeProc, tmp_path: Path, home: dict[str, str]) -> None:
    # A real, tiny file system: a 4 MiB tmpfs (root, as CI and these machines are).
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        code, data, _ = troubleshoot("--api", node.url, "--data-dir", str(small / "data"), env=home)
        assert code == 1
        c = only_failure(data, "Disk space")
        assert "under 1.1 GB" in c["detail"] and str(small / "data") in c["detail"]
        assert "free space" in c["fix"] and "node.data_dir" in c["fix"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def memory_cgroup(limit: int) -> tuple[list[str], Path]:
    """A child memory cgroup with `limit` bytes; the command prefix that runs inside it."""
    name = f"odtest-{uuid.uuid4().hex[:8]}"
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists():
        if "memory" not in Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split():
            pytest.skip("cgroup v2 without the memory controller delegated to children here")
        group = Path("/sys/fs/cgroup") / name
        group.mkdir()
        (group / "memory.max").write_text(str(limit))
    else:
        group = Path("/sys/fs/cgroup/memory") / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"], group


def test_memory_limit(node: NodeProc, home: dict[str, str]) -> None:
    prefix, group = memory_cgroup(300 << 20)
    try:
        code, data, _ = troubleshoot("--api", node.url, env=home, prefix=prefix)
        assert code == 1
        c = only_failure(data, "Memory")
        assert "this cgroup's memory limit" in c["detail"] and "smollm2:135m" not in c["detail"]
        assert "MemoryMax=" in c["fix"]
    finally:
        group.rmdir()


def test_engine_that_does_not_import(node: NodeProc, home: dict[str, str]) -> None:
    # llama-cpp-python finds libllama where LLAMA_CPP_LIB_PATH says: point it at nothing.
    code, data, _ = troubleshoot("--api", node.url, env={**home, "LLAMA_CPP_LIB_PATH": "/nonexistent"})
    assert code == 1
    c = only_failure(data, "Engine (llamacpp)")
    assert "does not import" in c["detail"] and "llama" in c["detail"]
    assert "reinstall llama-cpp-python" in c["fix"]


def test_dead_peer_and_skewed_clock(home: dict[str, str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with serve(node_routes("node-skewed", clock_offset=3600)) as skewed:
        peers = [
            {"id": "node-dead", "status": "down", "api_address": dead, "local": False},
            {"id": "node-skewed", "status": "active", "api_address": skewed, "local": False},
        ]
        with serve(node_routes("node-me", peers=peers)) as url:
            code, data, _text = troubleshoot("--api", url, env=home)
    assert code == 1
    bad = {c["name"]: c for c in by_status(data, "fail")}
    assert set(bad) == {"Peer node-dead", "Clock skew with node-skewed"}, bad
    assert dead in bad["Peer node-dead"]["detail"] and "unreachable" in bad["Peer node-dead"]["detail"]
    assert f"status --api {dead}" in bad["Peer node-dead"]["fix"]
    assert "+3600" in bad["Clock skew with node-skewed"]["detail"]
    assert "timedatectl set-ntp true" in bad["Clock skew with node-skewed"]["fix"]
    ok = {c["name"] for c in by_status(data, "pass")}
    assert {"Peer node-skewed", "Clock skew with node-me"} <= ok


@pytest.mark.parametrize("kind", ["nothing", "not a node", "garbage"])
def test_unreachable_or_not_a_node(kind: str, home: dict[str, str]) -> None:
    routes: dict[str, Any] = {"/health": lambda: (200, "application/json", b"\x00garbage{")}
    if kind == "nothing":
        code, data, _text = troubleshoot("--api", f"http://127.0.0.1:{free_port()}", env=home)
    else:
        with serve({} if kind == "not a node" else routes) as url:
            code, data, _text = troubleshoot("--api", url, env=home)
    assert code == 1
    service = data["checks"][0]
    assert service["name"] == "Service reachable" and service["status"] == "fail"
    assert service["fix"]
    assert {c["name"] for c in by_status(data, "skip")} >= {"Peers", "Clock skew"}


def test_real_two_node_cluster_then_a_peer_dies(tmp_path: Path, home: dict[str, str]) -> None:
    from ..conftest import start_node

    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a")
    b = None
    try:
        token = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(a.data_dir)], capture_output=True,
                               text=True, timeout=60, check=True).stdout.strip()
        b = start_node(tmp_path, "--engine", "mock", "--join", f"127.0.0.1:{a.p2p_port}", "--token", token,
                       data_dir=tmp_path / "b")
        b_id = b.get("/health")["node_id"]  # type: ignore[index]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = a.get("/api/distributed/nodes")["nodes"]  # type: ignore[index]
            if len(listed) == 2 and all(n["status"] == "active" for n in listed):
                break
            time.sleep(0.2)
        code, data, text = troubleshoot("--api", a.url, env=home)
        assert code == 0, text
        ok = {c["name"]: c for c in by_status(data, "pass")}
        assert f"Peer {b_id}" in ok and f":{b.api_port} answers" in ok[f"Peer {b_id}"]["detail"]
        assert f"Clock skew with {b_id}" in ok
        assert f"Port {a.p2p_port}/udp (P2P)" in ok

        b.stop(signal.SIGKILL)
        code, data, _text = troubleshoot("--api", a.url, env=home)
        assert code == 1
        bad = {c["name"]: c for c in by_status(data, "fail")}
        assert f":{b.api_port} unreachable" in bad[f"Peer {b_id}"]["detail"]
        assert (f"status --api http://localhost:{b.api_port}" in bad[f"Peer {b_id}"]["fix"]
                or b.url in bad[f"Peer {b_id}"]["fix"])
        assert set(bad) <= {f"Peer {b_id}", "Service reachable"}, bad  # degraded may already show

        # a leader that lost its only peer has no quorum: the node says degraded, status exits 1
        deadline = time.monotonic() + 20
        while a.get("/health")["status"] != "degraded" and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.2)
        st = subprocess.run([*CLI, "status", "--api", a.url], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, "NO_COLOR": "1"})
        assert st.returncode == 1, st.stdout + st.stderr
        assert "Overall Status: degraded" in st.stdout
        code, data, _text = troubleshoot("--api", a.url, env=home)
        service = data["checks"][0]
        assert code == 1 and service["status"] == "fail" and "degraded" in service["detail"]
    finally:
        if b is not None:
            b.stop()
        a.stop()
