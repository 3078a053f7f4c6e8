"""The node's ggml RPC server (engine.rpc_server, issue 16), on one machine.

A real node serves its CPU backend over llama.cpp's RPC on 127.0.0.1; the
bundled SmolLM2 loaded with half its layers on that RPC device gives the same
greedy answer as a local-only load; the port is bound on loopback only and
cannot be reached from another network namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import CLI, NodeProc, start_node

pytestmark = pytest.mark.integration

MEMORY_MIB = 768
N_LAYERS = 30  # SmolLM2-135M's transformer blocks
PROMPT = "The three primary colors are"

# Loads the bundled model in a process of its own (registering an RPC device
# is process-wide and for good), generates greedily, prints one JSON line.
SPLIT_SCRIPT = r"""
import json, sys
from ollama_distributed.engines import ggml_rpc
from ollama_distributed.models.catalog import find_default_gguf
port, layers, prompt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
devices = ggml_rpc.add_server(port) if port else []
import llama_cpp
llm = llama_cpp.Llama(model_path=str(find_default_gguf()), n_ctx=512, n_threads=2, n_gpu_layers=layers,
                      seed=1, verbose=True)
out = llm.create_completion(prompt, max_tokens=24, temperature=0.0, top_k=1)
print(json.dumps({"devices": devices, "text": out["choices"][0]["text"]}), flush=True)
"""


def until(what: str, timeout: float, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def rpc_service(node: NodeProc) -> dict[str, Any]:
    services = node.get("/api/distributed/status")["services"]  # type: ignore[index]
    rpc: dict[str, Any] = services["rpc"]
    return rpc


@pytest.fixture(scope="module")
def rpc_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """A node offering its CPU over RPC, configured through the environment."""
    tmp = tmp_path_factory.mktemp("rpc")
    n = start_node(tmp, env={"OLLAMA_DISTRIBUTED_ENGINE_RPC_SERVER": "true",
                             "OLLAMA_DISTRIBUTED_ENGINE_RPC_MEMORY_MIB": str(MEMORY_MIB)})
    try:
        until("the RPC server to listen", 90, lambda: rpc_service(n)["ready"])
        yield n
    finally:
        n.stop()


def rpc_port(node: NodeProc) -> int:
    return int(rpc_service(node)["address"].rsplit(":", 1)[1])


def run_split(port: int, layers: int) -> tuple[dict[str, Any], str]:
    r = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, str(port), str(layers), PROMPT],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_rpc_server_is_advertised(rpc_node: NodeProc) -> None:
    rpc = rpc_service(rpc_node)
    assert rpc["enabled"] and rpc["ready"] and rpc["memory_mib"] == MEMORY_MIB
    assert rpc["address"].startswith("127.0.0.1:")
    nodes = rpc_node.get("/api/distributed/nodes")["nodes"]  # type: ignore[index]
    me = next(n for n in nodes if n["local"])
    assert me["rpc"] == {"ready": True, "memory_mib": MEMORY_MIB}
    r = subprocess.run([*CLI, "status", "--verbose", "--api", rpc_node.url], capture_output=True, text=True,
                       timeout=30, check=False, env={**os.environ, "NO_COLOR": "1"})
    assert f"RPC: serving on {rpc['address']} (loopback only), {MEMORY_MIB} MiB offered" in r.stdout, r.stdout


def test_rpc_port_is_bound_on_loopback_only(rpc_node: NodeProc) -> None:
    port = rpc_port(rpc_node)
    r = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10,
                       check=True)
    local = [line.split()[3] for line in r.stdout.splitlines() if line.strip()]
    assert local == [f"127.0.0.1:{port}"], r.stdout


def test_split_model_answers_as_the_local_one(rpc_node: NodeProc) -> None:
    """Half the layers on the node's RPC server, half on this process's CPU:
    the same greedy text as everything on the local CPU."""
    port = rpc_port(rpc_node)
    local, _ = run_split(0, 0)
    split, log = run_split(port, N_LAYERS // 2)
    assert split["devices"] == ["RPC0"], split
    # llama.cpp says where the weights went: some on the RPC device, the rest on the CPU
    assert f"offloaded {N_LAYERS // 2}/{N_LAYERS + 1} layers" in log, log[-3000:]
    assert "RPC0" in log and "model buffer size" in log, log[-3000:]
    assert local["text"].strip(), local
    assert split["text"] == local["text"]
    assert "Accepted client connection" in rpc_node.log()


def test_rpc_server_restarts_and_dies_with_the_node(tmp_path: Path) -> None:
    """A killed server comes back; a node killed with -9 leaves no server behind."""
    n = start_node(tmp_path, "--engine", "mock", env={"OLLAMA_DISTRIBUTED_ENGINE_RPC_SERVER": "true"})
    try:
        first = until("the RPC server", 90, lambda: rpc_service(n)["ready"] and rpc_service(n))
        print("=== kill -9 the RPC server", flush=True)
        os.kill(first["pid"], signal.SIGKILL)
        again = until("the RPC server again", 90,
                      lambda: (s := rpc_service(n))["ready"] and s["pid"] != first["pid"] and s)
        assert again["restarts"] == 1
        assert n.get("/health")["status"] == "healthy"  # type: ignore[index]
        print("=== kill -9 the node", flush=True)
        n.proc.kill()
        n.proc.wait(10)
        until("the RPC server to die with the node", 30, lambda: not psutil.pid_exists(again["pid"])
              or psutil.Process(again["pid"]).status() == psutil.STATUS_ZOMBIE)
    finally:
        n.stop()


# ---- another network namespace cannot reach it --------------------------------


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    probe = f"odr-{uuid.uuid4().hex[:6]}"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


CONNECT = ("import socket,sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('open')\n"
           "except OSError as e:\n"
           "    print(type(e).__name__)\n")


def test_rpc_port_unreachable_from_another_namespace(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    node_ns, other_ns = f"odr-a-{tag}", f"odr-b-{tag}"
    node_ip, other_ip = "10.251.7.1", "10.251.7.2"
    port, control_port = 50052, 50053
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for ns in (node_ns, other_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"odra{tag}", "netns", node_ns, "type", "veth", "peer", "name", f"odrb{tag}",
           "netns", other_ns)
        sh("ip", "-n", node_ns, "addr", "add", f"{node_ip}/24", "dev", f"odra{tag}")
        sh("ip", "-n", other_ns, "addr", "add", f"{other_ip}/24", "dev", f"odrb{tag}")
        sh("ip", "-n", node_ns, "link", "set", f"odra{tag}", "up")
        sh("ip", "-n", other_ns, "link", "set", f"odrb{tag}", "up")
        env = {**os.environ, "HOME": str(tmp_path), "NO_COLOR": "1",
               "OLLAMA_DISTRIBUTED_ENGINE_RPC_SERVER": "true", "OLLAMA_DISTRIBUTED_ENGINE_RPC_PORT": str(port)}
        env.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
        log_path = tmp_path / "node.log"
        with open(log_path, "wb") as log:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", node_ns, *CLI, "start", "--engine", "mock", "--data-dir",
                 str(tmp_path / "data")], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
        # A control listener on every address of the node's namespace: proves the
        # other namespace does reach that namespace, so a refusal below means something.
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", node_ns, sys.executable, "-c",
             f"import socket,time;s=socket.create_server(('0.0.0.0',{control_port}));time.sleep(600)"]))

        def listening() -> list[str]:
            assert procs[0].poll() is None, log_path.read_text(errors="replace")
            r = sh("ip", "netns", "exec", node_ns, "ss", "-ltnH")
            return [line.split()[3] for line in r.stdout.splitlines() if line.strip()]

        until("the RPC server and the control listener", 90,
              lambda: any(a.endswith(f":{port}") for a in listening())
              and any(a.endswith(f":{control_port}") for a in listening()))
        assert [a for a in listening() if a.endswith(f":{port}")] == [f"127.0.0.1:{port}"]

        def connect(ns: str, host: str, p: int) -> str:
            return sh("ip", "netns", "exec", ns, sys.executable, "-c", CONNECT, host, str(p)).stdout.strip()

        assert connect(other_ns, node_ip, control_port) == "open"
        assert connect(other_ns, node_ip, port) == "ConnectionRefusedError"
        # not even through the node's own non-loopback address
        assert connect(node_ns, node_ip, port) == "ConnectionRefusedError"
        assert connect(other_ns, "127.0.0.1", port) == "ConnectionRefusedError"
        # the server goes with the node
        procs[0].terminate()
        procs[0].wait(30)
        until("the RPC server to stop with the node", 30,
              lambda: not any(a.endswith(f":{port}") for a in sh("ip", "netns", "exec", node_ns, "ss",
                                                                  "-ltnH").stdout.split()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in (node_ns, other_ns):
            sh("ip", "netns", "del", ns, check=False)
