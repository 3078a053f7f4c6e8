"""A request's tenant and priority cross the QUIC hop to the node that serves
it, its queue position comes back as X-Queue-Position, and a tenant over its
share of the serving node's queue gets 429 at the entry node (mock engine)."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest

from ..conftest import MODEL, NodeProc, start_node
from .test_nodes import converged, join_args, post, step, token_of, until

pytestmark = pytest.mark.cluster

ENV = {"OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "1", "OLLAMA_DISTRIBUTED_API_TRUSTED_PROXIES": "127.0.0.1"}
# b serves: one slot, a queue of 2 (one tenant may hold 1 of it), 20 tokens/s
B_ENV = {**ENV, "OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "1", "OLLAMA_DISTRIBUTED_ENGINE_MAX_QUEUE": "2",
         "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS_PER_SECOND": "20"}


def send(n: NodeProc, tenant: str, priority: str) -> http.client.HTTPConnection:
    c = http.client.HTTPConnection("127.0.0.1", n.api_port, timeout=60)
    c.request("POST", "/api/generate", json.dumps({"model": "b-only", "prompt": "x", "stream": False,
                                                   "options": {"num_predict": 20}}),
              {"Content-Type": "application/json", "X-Tenant": tenant, "X-Priority": priority})
    return c


def answer(c: http.client.HTTPConnection) -> tuple[int, dict[str, str], Any]:
    r = c.getresponse()
    body = json.loads(r.read())
    c.close()
    return r.status, dict(r.getheaders()), body


def b_queue(b: NodeProc) -> dict[str, Any]:
    q = b.get("/api/distributed/queue")
    assert isinstance(q, dict)
    return q


def rows(q: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    return [(r["tenant"], r["priority"]) for m in q["models"] if m["model"] in ("b-only", "b-only:latest") for r in m[kind]]


def test_tenant_and_priority_reach_the_serving_node(tmp_path: Path) -> None:
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=ENV)
    b = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)), data_dir=tmp_path / "b", env=B_ENV)
    try:
        until("two nodes", 30, lambda: converged([a, b], 2))
        step("a model only b holds")
        post(b.url + "/api/copy", {"source": MODEL, "destination": "b-only"})
        until("a lists b-only", 10, lambda: "b-only:latest" in [
            m["name"] for m in a.get("/api/tags")["models"]])  # type: ignore[index]
        time.sleep(2.0)  # a's scheduler takes peers' adverts about once a second

        step("alice's batch request and bob's interactive one, both sent to a, wait or run at b")
        first = send(a, "alice", "batch")
        until("alice runs at b", 10, lambda: rows(b_queue(b), "running") == [("alice", "batch")])
        second = send(a, "bob", "interactive")
        until("bob waits at b", 10, lambda: rows(b_queue(b), "queued") == [("bob", "interactive")])
        assert not rows(a.get("/api/distributed/queue"), "running")  # type: ignore[arg-type]

        step("bob's next request: over his share of b's queue, 429 at a")
        status, headers, body = answer(send(a, "bob", "interactive"))
        assert status == 429 and int(headers["Retry-After"]) >= 1, body
        assert "bob" in body["error"]

        step("the admitted ones finish; X-Queue-Position is b's")
        s1, h1, _ = answer(first)
        s2, h2, out = answer(second)
        assert (s1, s2) == (200, 200) and out["eval_count"] == 20
        assert h1["X-Queue-Position"] == "0" and h2["X-Queue-Position"] == "1"
    finally:
        a.stop()
        b.stop()
