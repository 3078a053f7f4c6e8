"""The cluster core through ClusterService: several nodes on 127.0.0.1 free UDP
ports, each with its own data dir. In-process nodes for formation and
forwarding; separate processes for kill -9."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from ollama_distributed import errors
from ollama_distributed.cluster import ClusterService

pytestmark = pytest.mark.cluster
HERE = pathlib.Path(__file__).resolve().parent


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service(tmp: pathlib.Path, node_id: str, join: list[str] | None = None,
            token: str | None = None, port: int | None = None) -> ClusterService:
    return ClusterService(node_id=node_id, data_dir=tmp / node_id, host="127.0.0.1",
                          port=port or udp_port(), join=join or [], token=token,
                          api_address=f"http://127.0.0.1/{node_id}", failure_timeout=1.0)


async def until(what: str, timeout: float, check: Callable[[], bool]) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def step(msg: str) -> None:
    print(f"=== {msg}", flush=True)


async def three(tmp: pathlib.Path) -> list[ClusterService]:
    a = service(tmp, "a")
    await a.start()
    await until("a leads", 5, lambda: a.status()["role"] == "leader")
    token = a.join_token()
    assert token and token.startswith("OD1:")
    b = service(tmp, "b", [a.local_address() or ""], token)
    await b.start()
    c = service(tmp, "c", [b.local_address() or ""], token)  # joining any member is enough
    await c.start()
    nodes = [a, b, c]
    await until("three voters alive everywhere", 10, lambda: all(
        len(n.nodes()) == 3 and all(x["alive"] and x["voter"] for x in n.nodes()) for n in nodes))
    return nodes


async def test_three_nodes_join_with_the_token_and_see_each_other(tmp_path: pathlib.Path) -> None:
    step("start a, join b through a and c through b")
    nodes = await three(tmp_path)
    try:
        statuses = [n.status() for n in nodes]
        leaders = {s["leader_id"] for s in statuses}
        assert len(leaders) == 1 and None not in leaders
        assert sum(s["role"] == "leader" for s in statuses) == 1
        for s in statuses:
            assert not s["degraded"]
            assert s["peers_connected"] == 2
            assert sorted(s["members"]) == ["a", "b", "c"]
        for n in nodes[0].nodes():
            assert set(n) >= {"id", "api_address", "p2p_address", "alive", "last_seen", "advert"}
            assert n["api_address"] == f"http://127.0.0.1/{n['id']}"
        step("tls material is private")
        for name in ("ca.key", "node.key", "join-secret", "ca.pem", "node.pem"):
            mode = stat.S_IMODE((tmp_path / "a" / "tls" / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
        assert nodes[1].join_token() == nodes[0].join_token()
        step("adverts reach every node")
        nodes[2].publish_advert({"models": ["m"], "in_flight": 7})
        await until("c's advert at a", 3, lambda: any(
            x["id"] == "c" and (x["advert"] or {}).get("in_flight") == 7 for x in nodes[0].nodes()))
    finally:
        for n in nodes:
            await n.stop()


async def test_wrong_token_is_refused_and_counted(tmp_path: pathlib.Path) -> None:
    a = service(tmp_path, "a")
    await a.start()
    try:
        await until("a leads", 5, lambda: a.status()["role"] == "leader")
        good = a.join_token() or ""
        bad = good.rsplit(":", 1)[0] + ":" + "0" * 32
        x = service(tmp_path, "x", [a.local_address() or ""], bad)
        with pytest.raises(PermissionError, match="invalid join token"):
            await x.start()
        assert a.status()["joins_refused"] == 1
        assert not (tmp_path / "x" / "tls" / "node.pem").exists()
        assert [n["id"] for n in a.nodes()] == ["a"]
        no_token = service(tmp_path, "y", [a.local_address() or ""], None)
        with pytest.raises(RuntimeError, match="token is required"):
            await no_token.start()
    finally:
        await a.stop()


async def test_forward_streams_maps_errors_and_cancels(tmp_path: pathlib.Path) -> None:
    nodes = await three(tmp_path)
    a, _, c = nodes
    events: list[str] = []

    async def handler(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if request.get("model") == "missing":
            raise errors.ModelNotFoundError("missing")
        if request.get("model") == "busy":
            raise errors.OverloadedError("queue full")
        try:
            for i in range(int(request["n"])):
                yield {"i": i, "served_by": "c"}
                if request.get("slow"):
                    await asyncio.sleep(0.05)
            events.append("done")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    c.set_inbound_handler(handler)
    try:
        step("a forwards to c and the chunks stream back in order")
        got = [ch async for ch in a.forward("c", {"n": 500})]
        assert [g["i"] for g in got] == list(range(500))
        assert got[0]["served_by"] == "c"
        assert c.status()["forwards_in"] == 1

        step("errors keep their class and status")
        with pytest.raises(errors.ModelNotFoundError) as e404:
            async for _ in a.forward("c", {"model": "missing"}):
                pass
        assert e404.value.status == 404
        with pytest.raises(errors.OverloadedError) as e503:
            async for _ in a.forward("c", {"model": "busy"}):
                pass
        assert e503.value.status == 503
        with pytest.raises(errors.PeerUnavailableError):
            async for _ in a.forward("nobody", {"n": 1}):
                pass

        step("closing the iterator cancels the work at c")
        it = a.forward("c", {"n": 100000, "slow": True})
        first = await it.__anext__()
        assert first["i"] == 0
        t0 = time.monotonic()
        await it.aclose()  # type: ignore[attr-defined]
        took = await until("cancellation at c", 3, lambda: "cancelled" in events)
        print(f"cancellation reached the far side in {(time.monotonic() - t0) * 1000:.1f} ms ({took:.3f}s)")
        assert "done" in events and events.count("cancelled") == 1
    finally:
        for n in nodes:
            await n.stop()


# ---- separate processes: kill -9 and restart -------------------------------------


class Proc:
    def __init__(self, tmp: pathlib.Path, node_id: str, port: int, join: list[str], token: str | None):
        self.node_id, self.port, self.tmp = node_id, port, tmp
        self.status_file = tmp / f"{node_id}.status.json"
        self.log = tmp / f"{node_id}.log"
        args = [sys.executable, str(HERE / "service_node.py"), "--id", node_id,
                "--data-dir", str(tmp / node_id), "--port", str(port), "--status-file", str(self.status_file)]
        for j in join:
            args += ["--join", j]
        if token:
            args += ["--token", token]
        self.status_file.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY"):
            self.proc.kill()
            raise AssertionError(f"{node_id} did not start: {line!r}\n{self.log.read_text()}")
        self.token = line.split()[1]

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.status_file.read_text())
            return data
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def alive_seen(self) -> dict[str, bool]:
        return {n["id"]: n["alive"] for n in self.state().get("nodes", [])}

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


async def test_kill9_marks_down_elects_and_the_node_rejoins(tmp_path: pathlib.Path) -> None:
    ports = {n: udp_port() for n in "abc"}
    procs: dict[str, Proc] = {}
    try:
        step("start three node processes")
        procs["a"] = Proc(tmp_path, "a", ports["a"], [], None)
        seed = [f"127.0.0.1:{ports['a']}"]
        procs["b"] = Proc(tmp_path, "b", ports["b"], seed, procs["a"].token)
        procs["c"] = Proc(tmp_path, "c", ports["c"], seed, procs["a"].token)
        await until("everyone sees three alive nodes", 15, lambda: all(
            p.alive_seen() == {"a": True, "b": True, "c": True} for p in procs.values()))
        await until("three voters", 10, lambda: all(
            len(p.state()["status"]["voters"]) == 3 for p in procs.values()))
        leader = procs["a"].state()["status"]["leader_id"]
        assert leader in procs
        survivors = [p for n, p in procs.items() if n != leader]

        step(f"kill -9 the leader {leader}")
        cert = (tmp_path / leader / "tls" / "node.pem").read_bytes()
        procs[leader].kill9()
        t_kill = time.monotonic()
        down = await until("survivors mark the leader down", 6, lambda: all(
            p.alive_seen().get(leader) is False for p in survivors))
        await until("a new leader", 8, lambda: all(
            p.state()["status"]["leader_id"] not in (None, leader) and
            p.state()["status"]["role"] in ("leader", "follower") for p in survivors))
        elected_at = time.monotonic() - t_kill
        print(f"marked down {down:.2f}s after kill -9; new leader {elected_at:.2f}s after kill -9")
        assert down <= 3.0, f"marked down after {down:.2f}s"
        assert elected_at <= 5.0, f"new leader after {elected_at:.2f}s"
        # a fresh leader counts as degraded until its first heartbeat round is acked
        await until("survivors report a healthy quorum", 2, lambda: not any(
            p.state()["status"]["degraded"] for p in survivors))

        step(f"restart {leader} with its data dir and no token")
        procs[leader] = Proc(tmp_path, leader, ports[leader], [], None)
        await until("the restarted node is back everywhere", 15, lambda: all(
            p.alive_seen() == {"a": True, "b": True, "c": True} for p in procs.values()))
        assert (tmp_path / leader / "tls" / "node.pem").read_bytes() == cert
        st = procs[leader].state()["status"]
        assert st["node_id"] == leader and sorted(st["voters"]) == ["a", "b", "c"]
    finally:
        for p in procs.values():
            p.stop()
