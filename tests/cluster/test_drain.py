"""Graceful drain through real node processes (issue 13): SIGTERM on a busy
worker lets its streams finish there while new requests go to the other
holder; past node.drain_timeout_s the rest migrate; `cluster drain` does the
same without stopping the node, and `undrain` ends it."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..conftest import CLI, MODEL, NodeProc
from .test_migration import MOCK, ask, interrupted, start_cluster, stop_all
from .test_nodes import metric, served_for_peers, status, step, until

pytestmark = pytest.mark.cluster


def ready(n: NodeProc) -> int:
    try:
        with urllib.request.urlopen(n.url + "/health/ready", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def migrations(n: NodeProc) -> float:
    return metric(n, "ollama_distributed_migrations_total", type="ongoing")


def test_sigterm_lets_the_stream_finish_and_sends_new_requests_elsewhere(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path, {**MOCK, "OLLAMA_DISTRIBUTED_NODE_DRAIN_TIMEOUT_S": "60"})
    try:
        n = 100  # 4 s at 25 tokens/s
        ref = ask(nodes["a"], "generate", "drain me", n)
        before = migrations(nodes["a"])
        seen: dict[str, Any] = {}

        def term(name: str) -> None:
            step(f"SIGTERM {name} (the serving worker) mid-stream")
            nodes[name].proc.send_signal(signal.SIGTERM)
            other = "c" if name == "b" else "b"
            seen["other"] = other
            until(f"{name} says not ready", 10, lambda: ready(nodes[name]) == 503)
            seen["ready"] = 503
            served = served_for_peers(nodes[other], MODEL)
            step("a new request meanwhile goes to the other worker")
            out = ask(nodes["a"], "generate", "another one", 5)
            seen["new"] = out
            seen["other_served"] = served_for_peers(nodes[other], MODEL) - served

        got, victim = interrupted(nodes, "generate", "drain me", 10, term, n)
        assert got.text == ref.text and got.final.get("eval_count") == n
        assert migrations(nodes["a"]) == before, "the stream finished on the draining node: nothing moved"
        assert seen["ready"] == 503 and seen["new"].final.get("done")
        assert seen["other_served"] == 1, seen
        code = nodes[victim].proc.wait(30)
        log = nodes[victim].log()
        print(log[log.find("shutting down"):][:600])
        assert code == 0 and "drained" in log
    finally:
        stop_all(nodes)


def test_past_the_drain_timeout_the_stream_migrates(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path, {**MOCK, "OLLAMA_DISTRIBUTED_NODE_DRAIN_TIMEOUT_S": "1"})
    try:
        n = 150  # 6 s at 25 tokens/s: longer than the drain timeout
        ref = ask(nodes["a"], "openai-chat", "drain me", n)
        before = migrations(nodes["a"])
        marks: dict[str, float] = {}

        def term(name: str) -> None:
            step(f"SIGTERM {name} with node.drain_timeout_s=1")
            marks["t"] = time.monotonic()
            nodes[name].proc.send_signal(signal.SIGTERM)

        got, victim = interrupted(nodes, "openai-chat", "drain me", 10, term, n)
        assert got.text == ref.text and got.final.get("eval_count") == n
        assert migrations(nodes["a"]) == before + 1
        assert nodes[victim].proc.wait(30) == 0
        assert "move to other nodes" in nodes[victim].log()
    finally:
        stop_all(nodes)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_cluster_drain_and_undrain_a_peer_from_any_node(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path, MOCK)
    try:
        b_id = status(nodes["b"])["node_id"]
        step(f"`cluster drain {b_id}` at a: b stops taking requests, still running")
        out = cli("cluster", "drain", b_id, "--api", nodes["a"].url, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["draining"] is True
        until("b's readiness is 503", 10, lambda: ready(nodes["b"]) == 503)
        assert nodes["b"].get("/health")["draining"] is True  # type: ignore[index]
        time.sleep(2.5)  # b's advert (draining) reaches a's scheduler
        served_b = served_for_peers(nodes["b"], MODEL)
        results: list[Any] = []

        def one(i: int) -> None:
            results.append(ask(nodes["a"], "generate", f"while b drains {i}", 10))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 4 and all(r.final.get("done") for r in results)
        assert served_for_peers(nodes["b"], MODEL) == served_b, "a draining node took new requests"
        assert nodes["b"].proc.poll() is None
        step("`cluster undrain` (at b itself, by default the node at --api)")
        out = cli("cluster", "undrain", "--api", nodes["b"].url)
        assert out.returncode == 0 and "taking requests again" in out.stdout, out
        until("b is ready again", 10, lambda: ready(nodes["b"]) == 200)
        out = cli("cluster", "drain", "no-such-node", "--api", nodes["a"].url)
        assert out.returncode != 0 and "no node 'no-such-node'" in out.stderr + out.stdout, out
    finally:
        stop_all(nodes)


def test_a_draining_leader_hands_over_before_it_stops(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path, MOCK)
    try:
        a_id = status(nodes["a"])["node_id"]
        assert status(nodes["a"])["role"] == "leader", "a started the cluster: it leads"
        term0 = status(nodes["a"])["term"]
        step("`cluster drain` of the leader, the process kept: it hands the lead over")
        out = cli("cluster", "drain", "--api", nodes["a"].url, "--json")
        assert out.returncode == 0, out.stderr
        took = until("b or c leads, seen by every node", 5, lambda: all(
            status(n)["leader_id"] not in (None, a_id) for n in nodes.values()))
        new = status(nodes["b"])["leader_id"]
        print(f"the lead moved to {new} {took:.2f} s after the drain began")
        assert status(nodes["a"])["role"] == "follower" and status(nodes["b"])["term"] > term0
        assert "leadership handed to" in nodes["a"].log()
        time.sleep(2.5)  # more than an election timeout: the held candidacy keeps a from taking it back
        assert all(status(n)["leader_id"] == new for n in nodes.values())
        step("undrain: a takes requests again and may stand for election again, as a follower")
        out = cli("cluster", "undrain", "--api", nodes["a"].url)
        assert out.returncode == 0, out
        until("a is ready again", 10, lambda: ready(nodes["a"]) == 200)
        assert status(nodes["a"])["role"] == "follower" and not status(nodes["a"])["degraded"]
        step("SIGTERM of the new leader: it hands over too, then exits cleanly")
        name = next(k for k, n in nodes.items() if status(n)["node_id"] == new)
        nodes[name].proc.send_signal(signal.SIGTERM)
        assert nodes[name].proc.wait(45) == 0
        assert "leadership handed to" in nodes[name].log()
        rest = [n for k, n in nodes.items() if k != name]
        until("the others agree on a leader among them", 5, lambda: all(
            status(n)["leader_id"] not in (None, new) for n in rest))
    finally:
        stop_all(nodes)
