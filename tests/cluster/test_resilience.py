"""Nothing a peer or an operator does crashes or hangs a node (issue 10),
through real node processes on the mock engine: a model held only by peers is
preloaded and unloaded like Ollama, engine.max_queue 0 means "no queue", a
wedged peer (SIGSTOP) never hangs the client, an embedding batch larger than a
frame crosses in parts, a request too large to forward is a 413, hostile
adverts change nothing but a counter, and a loop that dies turns the node
degraded by name."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import CLI, MODEL, REPO, NodeProc, start_node
from .test_nodes import join_args, metric, post, step, token_of, until

pytestmark = pytest.mark.cluster

MOCK = {"OLLAMA_DISTRIBUTED_ENGINE_KIND": "mock", "OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "1",
        "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS_PER_SECOND": "20",
        "OLLAMA_DISTRIBUTED_SCHEDULER_FIRST_TOKEN_TIMEOUT_S": "4",
        "OLLAMA_DISTRIBUTED_SCHEDULER_STREAM_IDLE_TIMEOUT_S": "3"}
# b and c serve one request at a time and queue nothing
NO_QUEUE = {**MOCK, "OLLAMA_DISTRIBUTED_ENGINE_MAX_QUEUE": "0", "OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "1"}


def error_of(e: urllib.error.HTTPError) -> str:
    return str(json.loads(e.read() or b"{}").get("error", ""))


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProc]]:
    """a holds no model (its default is off); b and c hold the bundled one."""
    tmp = tmp_path_factory.mktemp("resilience")
    step("start a (no models), b and c (the bundled model, no queue), on the mock engine")
    a = start_node(tmp, data_dir=tmp / "a", env={**MOCK, "OLLAMA_DISTRIBUTED_MODELS_DEFAULT": ""})
    token = token_of(a)
    b = start_node(tmp, *join_args(a, token), data_dir=tmp / "b", env=NO_QUEUE)
    c = start_node(tmp, *join_args(a, token), data_dir=tmp / "c", env=NO_QUEUE)
    nodes = {"a": a, "b": b, "c": c}
    until("a sees the bundled model on b and c", 30, lambda: holders(a, MODEL) == 2)
    time.sleep(1.5)  # a's scheduler takes the adverts it has seen once a second
    until("a routes the bundled model", 30, lambda: routable(a, MODEL))
    yield nodes
    for n in nodes.values():
        if n.proc.poll() is None:
            os.kill(n.proc.pid, signal.SIGCONT)
        n.stop()


def holders(a: NodeProc, model: str) -> int:
    models = a.get("/api/distributed/models")["models"]  # type: ignore[index]
    return sum(len(m["nodes"]) for m in models if m["name"] == model)


def routable(a: NodeProc, model: str) -> bool:
    """a's scheduler takes peers' adverts about once a second; until then, 404."""
    try:
        post(a.url + "/api/generate", {"model": model, "prompt": "x", "stream": False,
                                       "options": {"num_predict": 1}})
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        return False
    return True


def loaded_at(n: NodeProc) -> list[str]:
    return [m["name"] for m in n.get("/api/ps")["models"]]  # type: ignore[index]


def test_preload_and_unload_of_a_model_only_peers_hold(trio: dict[str, NodeProc]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    step("empty generate, chat and embed at a: loads on a holder, like Ollama")
    out = post(a.url + "/api/generate", {"model": MODEL})
    assert out["done"] is True and out["done_reason"] == "load", out
    out = post(a.url + "/api/chat", {"model": MODEL, "messages": []})
    assert out["done"] is True and out["done_reason"] == "load", out
    assert post(a.url + "/api/embed", {"model": MODEL, "input": []})["embeddings"] == []
    req = urllib.request.Request(a.url + "/api/generate", data=json.dumps({"model": MODEL, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        lines = [json.loads(x) for x in r.read().splitlines() if x.strip()]
    assert lines[-1]["done_reason"] == "load"
    assert MODEL in loaded_at(b) + loaded_at(c)
    step("keep_alive 0 at a: unloaded on every holder")
    out = post(a.url + "/api/generate", {"model": MODEL, "keep_alive": 0})
    assert out["done_reason"] == "unload", out
    assert MODEL not in loaded_at(b) + loaded_at(c)
    out = post(a.url + "/api/chat", {"model": MODEL, "messages": [], "keep_alive": 0})
    assert out["done_reason"] == "unload", out
    assert a.proc.poll() is None and "Traceback" not in a.log()


def test_max_queue_0_means_no_queue_not_every_peer_saturated(trio: dict[str, NodeProc]) -> None:
    a = trio["a"]
    step("two requests at once at a, b and c each with one slot and no queue")
    results: list[Any] = []

    def one(i: int) -> None:
        try:
            results.append(post(a.url + "/api/generate", {"model": MODEL, "prompt": f"n{i}", "stream": False,
                                                          "options": {"num_predict": 10}}, timeout=60))
        except urllib.error.HTTPError as e:
            results.append(f"{e.code} {error_of(e)}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 2 and all(isinstance(r, dict) and r["eval_count"] == 10 for r in results), results


def test_a_wedged_peer_never_hangs_the_client(trio: dict[str, NodeProc]) -> None:
    a, b = trio["a"], trio["b"]
    post(b.url + "/api/copy", {"source": MODEL, "destination": "only-b"})
    until("a routes only-b", 15, lambda: routable(a, "only-b"))
    step("a stream served by b; SIGSTOP b after the first chunk")
    body = json.dumps({"model": "only-b", "prompt": "go", "options": {"num_predict": 200}}).encode()
    t0 = time.monotonic()
    with urllib.request.urlopen(urllib.request.Request(a.url + "/api/generate", data=body), timeout=60) as r:
        first = json.loads(r.readline())
        assert first["done"] is False
        os.kill(b.proc.pid, signal.SIGSTOP)
        try:
            rest = [json.loads(x) for x in r.read().splitlines() if x.strip()]
        finally:
            stopped_for = time.monotonic() - t0
    try:
        assert "error" in rest[-1], rest[-1]
        assert stopped_for < 30, f"the stream took {stopped_for:.1f}s to end"
        print("the client saw:", rest[-1]["error"])
        step("a new request for only-b while b is stopped: an error, not a hang")
        t0 = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as err:
            post(a.url + "/api/generate", {"model": "only-b", "prompt": "again", "stream": False}, timeout=60)
        assert err.value.code in (404, 502, 503, 504), err.value.code
        assert time.monotonic() - t0 < 30
        step("the bundled model is still served (by c) while b is stopped")
        out = post(a.url + "/api/generate", {"model": MODEL, "prompt": "x", "stream": False,
                                             "options": {"num_predict": 3}}, timeout=60)
        assert out["eval_count"] == 3
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    until("b is back", 30, lambda: b.get("/health")["status"] == "healthy")  # type: ignore[index]
    assert a.proc.poll() is None and b.proc.poll() is None


def test_embeddings_larger_than_a_frame_cross_in_parts(trio: dict[str, NodeProc]) -> None:
    a = trio["a"]
    step("120,000 inputs at a, served by a peer: ~19 MB of vectors, more than one 16 MiB frame")
    inputs = [f"w{i}" for i in range(120_000)]
    out = post(a.url + "/api/embed", {"model": MODEL, "input": inputs}, timeout=120)
    assert len(out["embeddings"]) == len(inputs)
    assert out["embeddings"][0] != out["embeddings"][1]


def test_a_request_too_large_to_forward_is_413_not_retried(trio: dict[str, NodeProc]) -> None:
    a = trio["a"]
    before = a.log().count("trying the next holder")
    with pytest.raises(urllib.error.HTTPError) as err:
        post(a.url + "/api/generate", {"model": MODEL, "prompt": "x" * (17 << 20), "stream": False})
    assert err.value.code == 413, err.value.code
    assert "too large" in error_of(err.value)
    assert a.log().count("trying the next holder") == before


def test_hostile_adverts_change_nothing_but_a_counter(trio: dict[str, NodeProc], tmp_path: Path) -> None:
    a = trio["a"]
    step("a node whose adverts carry wrong types and ranges joins")
    bad = start_node(tmp_path, *join_args(a, token_of(a)), data_dir=tmp_path / "bad", env=MOCK,
                     cli=[sys.executable, str(REPO / "tests/cluster/patched_node.py"), "hostile-advert"])
    try:
        until("a rejects its adverts", 20,
              lambda: metric(a, "ollama_distributed_peer_adverts_rejected_total") > 0)
        for path in ("/api/tags", "/api/ps", "/api/distributed/nodes", "/api/distributed/models", "/health"):
            a.get(path)  # 200, or this raises
        out = post(a.url + "/api/generate", {"model": MODEL, "prompt": "x", "stream": False,
                                             "options": {"num_predict": 2}})
        assert out["eval_count"] == 2
        assert a.proc.poll() is None
        assert "ignored an advert from" in a.log()
    finally:
        bad.stop()


def test_a_loop_that_dies_turns_the_node_degraded_by_name(tmp_path: Path) -> None:
    n = start_node(tmp_path, env=MOCK, cli=[sys.executable, str(REPO / "tests/cluster/patched_node.py"),
                                            "advert-dies"])
    try:
        until("health degraded", 20, lambda: n.get("/health")["status"] == "degraded")  # type: ignore[index]
        health: dict[str, Any] = n.get("/health")  # type: ignore[assignment]
        assert "advert" in health["failed_tasks"], health
        assert "planted" in health["failed_tasks"]["advert"]
        import subprocess

        out = subprocess.run([*CLI, "status", "--api", n.url], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "advert" in out.stdout, out.stdout
        assert "Traceback" in n.log() and "ended for good" in n.log()
        assert n.proc.poll() is None  # still answering; systemd's watchdog restarts it
    finally:
        n.stop()
