"""Partition: three nodes in their own network namespaces, joined by veth to a
bridge. Cut one off: the majority keeps a leader and serves, the cut-off node
says it is degraded (/health, /api/distributed/status, `status` exits 1).
Heal: everything converges again. Mock engine: this is about the cluster.

Needs root and `ip netns`; skips with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import CLI, MODEL

pytestmark = pytest.mark.cluster

SUBNET = "10.231.77"  # only inside the namespaces this test creates


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"odp-{uuid.uuid4().hex[:6]}"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Net:
    """A hub namespace with a bridge, and one namespace per node on a veth."""

    def __init__(self, n: int) -> None:
        tag = uuid.uuid4().hex[:5]
        self.hub = f"od-hub-{tag}"
        self.names = [f"od-n{i}-{tag}" for i in range(1, n + 1)]
        self.ips = [f"{SUBNET}.{i}" for i in range(1, n + 1)]
        self.hub_ends = [f"odh{i}{tag}" for i in range(1, n + 1)]
        sh("ip", "netns", "add", self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for ns, ip, hub_end in zip(self.names, self.ips, self.hub_ends, strict=True):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", hub_end, "netns", self.hub, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            sh("ip", "-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def cut(self, i: int) -> None:
        sh("ip", "-n", self.hub, "link", "set", self.hub_ends[i], "down")

    def heal(self, i: int) -> None:
        sh("ip", "-n", self.hub, "link", "set", self.hub_ends[i], "up")

    def close(self) -> None:
        for ns in [*self.names, self.hub]:
            sh("ip", "netns", "del", ns, check=False)


class NsNode:
    def __init__(self, net: Net, i: int, tmp: Path, *args: str) -> None:
        self.ns, self.ip = net.names[i], net.ips[i]
        self.data = tmp / f"n{i + 1}"
        self.log_path = tmp / f"n{i + 1}.log"
        env = {**os.environ, "HOME": str(tmp), "NO_COLOR": "1"}
        env.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
        with open(self.log_path, "wb") as log:
            # default ports: each namespace has its own
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *CLI, "start", "--engine", "mock", "--data-dir",
                 str(self.data), "--api-host", "127.0.0.1", *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)

    def get(self, path: str) -> Any:
        code = ("import json,sys,urllib.request;"
                f"print(urllib.request.urlopen('http://127.0.0.1:8080{path}',timeout=5).read().decode())")
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=20, check=False)
        if r.returncode != 0:
            raise OSError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "request failed")
        return json.loads(r.stdout)

    def post(self, path: str, body: Any) -> Any:
        code = ("import json,sys,urllib.request;"
                f"r=urllib.request.Request('http://127.0.0.1:8080{path}',data=sys.stdin.buffer.read(),"
                "headers={'Content-Type':'application/json'});"
                "b=urllib.request.urlopen(r,timeout=30).read().decode();print(b or 'null')")
        r = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code],
                           capture_output=True, text=True, timeout=40, input=json.dumps(body), check=False)
        if r.returncode != 0:
            raise OSError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "request failed")
        return json.loads(r.stdout)

    def status_exit(self) -> int:
        r = subprocess.run(["ip", "netns", "exec", self.ns, *CLI, "status", "--api", "http://127.0.0.1:8080"],
                           capture_output=True, text=True, timeout=30, check=False)
        return r.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def until(what: str, timeout: float, check: Callable[[], bool]) -> float:
    t0 = time.monotonic()
    last: Exception | None = None
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except (OSError, KeyError, ValueError) as e:
            last = e
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")
        time.sleep(0.2)


def step(msg: str) -> None:
    print(f"=== {msg}", flush=True)


@pytest.fixture
def net() -> Iterator[Net]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    n = Net(3)
    try:
        yield n
    finally:
        n.close()


def test_a_cut_off_node_is_degraded_and_the_majority_serves(net: Net, tmp_path: Path) -> None:
    nodes: list[NsNode] = []
    try:
        step("three nodes in three namespaces")
        nodes.append(NsNode(net, 0, tmp_path))
        until("n1 ready", 60, lambda: nodes[0].get("/health/ready")["status"] == "ready")
        token = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(nodes[0].data)],
                               capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        for i in (1, 2):
            nodes.append(NsNode(net, i, tmp_path, "--join", f"{net.ips[0]}:4001", "--token", token))

        def converged() -> bool:
            st = [n.get("/api/distributed/status") for n in nodes]
            return (all(s["cluster_size"] == 3 and len(s["active_nodes"]) == 3 and not s["degraded"] for s in st)
                    and len({s["leader_id"] for s in st}) == 1)

        until("three nodes agree", 60, converged)
        addresses = {n["p2p_address"].split(":")[0] for n in nodes[0].get("/api/distributed/nodes")["nodes"]
                     if not n.get("local")}
        assert addresses == {net.ips[1], net.ips[2]}, addresses

        # cut off a follower so the test does not depend on election timing twice
        leader = nodes[0].get("/api/distributed/status")["leader_id"]
        ids = [n.get("/api/distributed/status")["node_id"] for n in nodes]
        cut = next(i for i in range(3) if ids[i] != leader)
        majority = [n for i, n in enumerate(nodes) if i != cut]
        step(f"cut n{cut + 1} off the bridge")
        net.cut(cut)
        took = until("the cut-off node reports degraded", 15, lambda: nodes[cut].get("/health")["status"] == "degraded"
                     and nodes[cut].get("/api/distributed/status")["degraded"])
        print(f"cut-off node degraded after {took:.1f}s")
        assert nodes[cut].status_exit() == 1
        until("the majority sees it down", 10, lambda: all(
            sum(x["status"] == "active" for x in n.get("/api/distributed/nodes")["nodes"]) == 2 for n in majority))
        for n in majority:
            s = n.get("/api/distributed/status")
            assert not s["degraded"] and s["leader_id"] == leader
        step("the majority keeps serving")
        out = majority[0].post("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False})
        assert out["done"] is True
        assert majority[0].status_exit() == 0

        step("heal")
        net.heal(cut)
        took = until("everything converges", 30, converged)
        print(f"converged {took:.1f}s after healing")
        assert nodes[cut].status_exit() == 0
    finally:
        for n in nodes:
            n.stop()
