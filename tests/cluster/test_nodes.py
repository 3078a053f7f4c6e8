"""The cluster tier through real node processes (`ollama-distributed start`) on
127.0.0.1, each with its own ports and data dir: join with the token, one
leader, a model only one node holds served through another, load spread,
a wrong token refused, kill -9 of the leader and of a node mid-request."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import CLI, MODEL, NodeProc, start_node

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", autouse=True)
def models_stay_where_they_are() -> Iterator[None]:
    """These tests place models on chosen nodes; replication (test_replication)
    would copy them elsewhere, so each model keeps its one copy here."""
    key = "OLLAMA_DISTRIBUTED_MODELS_REPLICAS"
    old = os.environ.get(key)
    os.environ[key] = "1"
    yield
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


def step(msg: str) -> None:
    print(f"=== {msg}", flush=True)


def until(what: str, timeout: float, check: Callable[[], bool]) -> float:
    t0 = time.monotonic()
    last: Exception | None = None
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except (OSError, KeyError, ValueError) as e:  # a node restarting, a field not there yet
            last = e
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")
        time.sleep(0.05)


def post(url: str, obj: Any, timeout: float = 300) -> Any:
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body else None


def status(n: NodeProc) -> dict[str, Any]:
    s: dict[str, Any] = n.get("/api/distributed/status")  # type: ignore[assignment]
    return s


def metric(n: NodeProc, name: str, **labels: str) -> float:
    with urllib.request.urlopen(n.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def served_for_peers(n: NodeProc, model: str) -> float:
    return metric(n, "ollama_distributed_requests_total", endpoint="peer:generate", model=model)


def token_of(n: NodeProc) -> str:
    out = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(n.data_dir)], capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


def join_args(seed: NodeProc, token: str) -> list[str]:
    return ["--join", f"127.0.0.1:{seed.p2p_port}", "--token", token]


def converged(nodes: list[NodeProc], size: int) -> bool:
    st = [status(n) for n in nodes]
    leaders = {s["leader_id"] for s in st}
    return (all(s["cluster_size"] == size and len(s["active_nodes"]) == size and not s["degraded"] for s in st)
            and len(leaders) == 1 and None not in leaders and sum(s["role"] == "leader" for s in st) == 1)


def start_trio(tmp: Path, *args: str, envs: dict[str, dict[str, str]] | None = None) -> dict[str, NodeProc]:
    envs = envs or {}
    a = start_node(tmp, *args, data_dir=tmp / "a", env=envs.get("a"))
    token = token_of(a)
    assert token.startswith("OD1:")
    b = start_node(tmp, *args, *join_args(a, token), data_dir=tmp / "b", env=envs.get("b"))
    c = start_node(tmp, *args, *join_args(b, token), data_dir=tmp / "c", env=envs.get("c"))  # any member
    nodes = {"a": a, "b": b, "c": c}
    until("three nodes, one leader, everywhere", 30, lambda: converged(list(nodes.values()), 3))
    return nodes


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProc]]:
    """Three nodes on the real llama.cpp engine."""
    tmp = tmp_path_factory.mktemp("trio")
    step("start a, b joins a, c joins b, with the token")
    nodes = start_trio(tmp)
    yield nodes
    for n in nodes.values():
        n.stop()


def test_three_nodes_join_and_agree_on_one_leader(trio: dict[str, NodeProc]) -> None:
    ids = {name: status(n)["node_id"] for name, n in trio.items()}
    assert len(set(ids.values())) == 3
    for n in trio.values():
        health: dict[str, Any] = n.get("/health")  # type: ignore[assignment]
        assert health["services"]["p2p_peers"] == 2
        assert health["services"]["available_nodes"] == 3
        listed: dict[str, Any] = n.get("/api/distributed/nodes")  # type: ignore[assignment]
        assert {x["id"] for x in listed["nodes"]} == set(ids.values())
        assert all(x["status"] == "active" for x in listed["nodes"])
    assert sum(bool(n.get("/health")["services"]["consensus_leader"]) for n in trio.values()) == 1  # type: ignore[index]


def test_a_model_only_on_c_is_served_through_a(trio: dict[str, NodeProc]) -> None:
    a, c = trio["a"], trio["c"]
    step("copy the model to a name only c holds")
    post(c.url + "/api/copy", {"source": MODEL, "destination": "only-c"})
    until("a lists only-c", 10, lambda: "only-c:latest" in [m["name"] for m in a.get("/api/tags")["models"]])  # type: ignore[index]
    before = served_for_peers(c, "only-c:latest")
    step("generate at a")
    got: dict[str, Any] = {}

    def generate() -> bool:
        # a's scheduler takes peers' adverts about once a second; until then, 404
        try:
            got["out"] = post(a.url + "/api/generate", {"model": "only-c", "prompt": "Say hi.", "stream": False,
                                                        "options": {"num_predict": 8, "seed": 1}})
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
            return False
        return True

    until("a routes only-c", 5, generate)
    out = got["out"]
    assert out["done"] is True and out["response"] and out["eval_count"] > 0
    assert served_for_peers(c, "only-c:latest") == before + 1, "c's counters must show c did the work"
    c_id = status(c)["node_id"]
    assert metric(a, "ollama_distributed_forwarded_requests_total", peer=c_id, outcome="ok") >= 1
    assert metric(a, "ollama_distributed_requests_total", endpoint="peer:generate") == 0
    models: dict[str, Any] = a.get("/api/distributed/models")  # type: ignore[assignment]
    text = json.dumps(models)
    assert "only-c" in text and c_id in text


def test_concurrent_requests_at_a_spread_to_b_and_c(trio: dict[str, NodeProc]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    before = {k: served_for_peers(n, MODEL) for k, n in (("b", b), ("c", c))}
    errors: list[Exception] = []

    def one(i: int) -> None:
        try:
            out = post(a.url + "/api/generate", {"model": MODEL, "prompt": f"Count to {i + 3}.", "stream": False,
                                                 "options": {"num_predict": 24}})
            assert out["done"] is True
        except (OSError, AssertionError, ValueError) as e:  # collected and asserted below
            errors.append(e)

    step("six concurrent requests at a")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    assert not errors, errors
    after = {k: served_for_peers(n, MODEL) for k, n in (("b", b), ("c", c))}
    served = {k: int(after[k] - before[k]) for k in after}
    served["a"] = 6 - sum(served.values())
    print("served:", served)
    # scheduler.policy prefix_aware (the default): the six share their prompt's
    # template prefix, so they stay where it is warm until that node's load
    # would pass the bound, ceil(1.25 x (in flight + 1) / nodes): they spread
    # over at least two nodes (least_loaded would use all three)
    assert served["b"] + served["c"] > 0, served
    assert sum(1 for v in served.values() if v > 0) >= 2, served


def test_a_wrong_token_is_refused(trio: dict[str, NodeProc], tmp_path: Path) -> None:
    a = trio["a"]
    bad = token_of(a).rsplit(":", 1)[0] + ":" + "0" * 32
    step("a node with a wrong token")
    d = start_node(tmp_path, *join_args(a, bad), data_dir=tmp_path / "d", wait=False)
    try:
        code = d.proc.wait(60)
    finally:
        d.stop()
    assert code != 0
    assert "invalid join token" in d.log()
    until("a logs the refusal", 5, lambda: "wrong token" in a.log())
    assert len(status(a)["active_nodes"]) == 3
    import urllib.request

    with urllib.request.urlopen(a.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    refusals = [line for line in text.splitlines()
                if line.startswith('ollama_distributed_peer_refusals_total{reason="bad_token"}')]
    assert refusals and float(refusals[0].split()[-1]) >= 1, "refused joins are counted in metrics"


def test_kill9_the_leader_then_it_rejoins(trio: dict[str, NodeProc]) -> None:
    """Last in the module: it changes the trio."""
    by_id = {status(n)["node_id"]: k for k, n in trio.items()}
    leader_id = status(trio["a"])["leader_id"]
    leader = by_id[leader_id]
    rest = [n for k, n in trio.items() if k != leader]
    step(f"kill -9 the leader ({leader})")
    trio[leader].stop(sig=9)
    t0 = time.monotonic()
    until("a new leader among the survivors", 8, lambda: all(
        status(n)["leader_id"] not in (None, leader_id) for n in rest))
    elected = time.monotonic() - t0
    until("the dead leader marked down", 5, lambda: all(
        any(x["id"] == leader_id and x["status"] == "down" for x in n.get("/api/distributed/nodes")["nodes"])  # type: ignore[index]
        for n in rest))
    print(f"new leader {elected:.2f}s after kill -9")
    assert elected <= 5.0
    step("requests through the survivors still succeed")
    for n in rest:
        out = post(n.url + "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                             "options": {"num_predict": 4}})
        assert out["done"] is True
    step(f"restart {leader} on its data dir: it rejoins with the same id")
    old = trio[leader]
    trio[leader] = start_node(old.data_dir.parent, data_dir=old.data_dir)
    assert status(trio[leader])["node_id"] == leader_id
    until("three active nodes again", 30, lambda: converged(list(trio.values()), 3))


def test_kill9_the_serving_node_before_its_first_token(tmp_path: Path) -> None:
    """Mock engine: b and c answer after 2.5 s; the request at a goes to one of
    them; kill it before its first token and a retries on the other."""
    slow = {"OLLAMA_DISTRIBUTED_ENGINE_MOCK_TTFT_MS": "2500"}
    nodes = start_trio(tmp_path, "--engine", "mock", envs={"b": slow, "c": slow})
    try:
        # two copies wanted (models.replicas is 1 here), so neither is dropped
        post(nodes["a"].url + "/api/distributed/placement", {"model": "remote-only", "replicas": 2})
        for k in ("b", "c"):
            post(nodes[k].url + "/api/copy", {"source": MODEL, "destination": "remote-only"})
        until("a lists remote-only", 10, lambda: "remote-only:latest" in [
            m["name"] for m in nodes["a"].get("/api/tags")["models"]])  # type: ignore[index]
        time.sleep(2.0)  # a's scheduler takes peers' adverts about once a second
        result: dict[str, Any] = {}

        def ask() -> None:
            try:
                result["out"] = post(nodes["a"].url + "/api/generate",
                                     {"model": "remote-only", "prompt": "hi", "stream": False}, timeout=60)
            except urllib.error.HTTPError as e:
                result["err"] = f"{e.code} {e.read()!r}"

        t = threading.Thread(target=ask)
        t.start()
        serving: list[str] = []

        def find() -> bool:
            serving[:] = [k for k in ("b", "c") if status(nodes[k])["scheduler_stats"]["in_flight"] > 0]
            return bool(serving)

        until("b or c takes the request", 5, lambda: find() or "err" in result)
        assert "err" not in result, result
        victim = serving[0]
        step(f"kill -9 {victim} before its first token")
        nodes[victim].stop(sig=9)
        t.join(60)
        assert "err" not in result, result
        assert result["out"]["done"] is True and result["out"]["response"]
        other = "c" if victim == "b" else "b"
        assert served_for_peers(nodes[other], "remote-only:latest") == 1
    finally:
        for n in nodes.values():
            n.stop()


def test_a_client_that_disconnects_at_a_cancels_the_work_at_b(tmp_path: Path) -> None:
    """Mock engine at 20 tokens/s on b; the model lives only on b."""
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a")
    b = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)), data_dir=tmp_path / "b",
                   env={"OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS_PER_SECOND": "20"})
    try:
        until("two nodes", 30, lambda: converged([a, b], 2))
        post(b.url + "/api/copy", {"source": MODEL, "destination": "b-only"})
        until("a lists b-only", 10, lambda: "b-only:latest" in [
            m["name"] for m in a.get("/api/tags")["models"]])  # type: ignore[index]
        time.sleep(2.0)  # a's scheduler takes peers' adverts about once a second
        step("stream from a, read two chunks, hang up")
        req = urllib.request.Request(a.url + "/api/generate", data=json.dumps(
            {"model": "b-only", "prompt": "long", "options": {"num_predict": 2000}}).encode(),
            headers={"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=30)
        assert json.loads(resp.readline())["response"]
        assert json.loads(resp.readline())["response"]
        until("b runs it", 5, lambda: status(b)["scheduler_stats"]["in_flight"] == 1)
        resp.close()
        t0 = time.monotonic()
        took = until("b stops the work", 10, lambda: status(b)["scheduler_stats"]["in_flight"] == 0)
        print(f"b stopped {took:.2f}s after the client hung up at a")
        assert time.monotonic() - t0 < 10
        assert metric(b, "ollama_distributed_requests_total", endpoint="peer:generate", status="499") == 1
    finally:
        a.stop()
        b.stop()


def test_a_node_down_for_good_is_removed(tmp_path: Path) -> None:
    nodes = start_trio(tmp_path, "--engine", "mock")
    try:
        ids = {k: status(n)["node_id"] for k, n in nodes.items()}

        def remove(at: str, node_id: str) -> tuple[int, dict[str, Any]]:
            req = urllib.request.Request(nodes[at].url + f"/api/distributed/nodes/{node_id}", method="DELETE")
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        step("refused while c is up, for the node itself, and for a stranger")
        code, body = remove("a", ids["c"])
        assert code == 409 and "stop it first" in body["error"], body
        code, body = remove("a", ids["a"])
        assert code == 409 and "itself" in body["error"], body
        assert remove("a", "node-nobody")[0] == 404

        step("kill -9 c; once it is down, `cluster remove` at b takes it out")
        old_token = token_of(nodes["a"])
        nodes["c"].stop(sig=9)
        # asked as soon as b sees it down: the leader may see it a moment later,
        # and waits for that rather than calling it up
        until("c down at b", 15, lambda: any(
            n["id"] == ids["c"] and n["status"] == "down"
            for n in nodes["b"].get("/api/distributed/nodes")["nodes"]))  # type: ignore[index]
        r = subprocess.run([*CLI, "cluster", "remove", ids["c"], "--api", nodes["b"].url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"Removed {ids['c']}" in r.stdout, r
        until("c gone from a's and b's member lists", 10, lambda: all(
            ids["c"] not in [n["id"] for n in nodes[k].get("/api/distributed/nodes")["nodes"]]  # type: ignore[index]
            for k in ("a", "b")))
        assert all(not status(nodes[k])["degraded"] and status(nodes[k])["cluster_size"] == 2 for k in ("a", "b"))
        r = subprocess.run([*CLI, "cluster", "remove", ids["c"], "--api", nodes["a"].url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "not found" in r.stderr, r

        step("the removal rotated the join secret: the token c joined with no longer joins")
        until("a new token at a and b", 10, lambda: token_of(nodes["a"]) != old_token
              and token_of(nodes["b"]) == token_of(nodes["a"]))
        d = start_node(tmp_path, "--engine", "mock", *join_args(nodes["a"], old_token), data_dir=tmp_path / "d",
                       wait=False)
        nodes["d"] = d
        assert d.proc.wait(90) != 0
        assert "invalid join token" in d.log(), d.log()

        step("c back with its old certificate: refused on accept, counted, never a member again")
        c2 = start_node(tmp_path, "--engine", "mock", data_dir=nodes["c"].data_dir, wait=False)
        nodes["c2"] = c2
        until("c's certificate refused at a or b", 30, lambda: sum(
            metric(nodes[k], "ollama_distributed_peer_refusals_total", reason="denied_certificate")
            for k in ("a", "b")) >= 1)
        time.sleep(2)
        assert all(ids["c"] not in [n["id"] for n in nodes[k].get("/api/distributed/nodes")["nodes"]]  # type: ignore[index]
                   for k in ("a", "b"))
        assert all(not status(nodes[k])["degraded"] and status(nodes[k])["cluster_size"] == 2 for k in ("a", "b"))

        step("`cluster token --rotate` at b: a new token, which a answers joins with too")
        before = token_of(nodes["a"])
        r = subprocess.run([*CLI, "cluster", "token", "--rotate", "--data-dir", str(nodes["b"].data_dir)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r
        rotated = r.stdout.strip()
        assert rotated.startswith("OD1:") and rotated != before
        until("a's token is the rotated one", 10, lambda: token_of(nodes["a"]) == rotated)
        e = start_node(tmp_path, "--engine", "mock", *join_args(nodes["a"], rotated), data_dir=tmp_path / "e")
        nodes["e"] = e
        until("e joined", 30, lambda: status(e)["cluster_size"] == 3)
    finally:
        for n in nodes.values():
            n.stop()
