"""Fairness and priorities through a real node process on the mock engine
(one slot, a per-token delay): a tenant over its share of the queue gets 429
while another is still admitted, X-Queue-Position, GET /api/distributed/queue
and `ollama-distributed queue`, X-Priority batch behind interactive, a key's
weight and default priority, and bad header values answered 400."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import CLI, MODEL, NodeProc, start_node

# One slot, a queue of 6 (a tenant may hold ceil(6 x 0.5) = 3 of it), 20
# tokens a second: a 20-token request holds the slot for about a second.
ENV = {"OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "1", "OLLAMA_DISTRIBUTED_ENGINE_MAX_QUEUE": "6",
       "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS_PER_SECOND": "20",
       "OLLAMA_DISTRIBUTED_API_TRUSTED_PROXIES": "127.0.0.1"}


def step(what: str) -> None:
    print(f"=== {what}", flush=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = start_node(tmp_path_factory.mktemp("fair"), "--engine", "mock", env=ENV)
    yield n
    n.stop()


class Pending:
    """A request sent now whose answer is read later (http.client sends at once)."""

    def __init__(self, node: NodeProc, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=60)
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **headers})
        self.finished_at = 0.0

        self.answer: tuple[int, dict[str, str], Any] | None = None

    def result(self) -> tuple[int, dict[str, str], Any]:
        if self.answer is None:
            r = self.conn.getresponse()
            raw = r.read()
            self.finished_at = time.monotonic()
            self.conn.close()
            self.answer = r.status, {k: v for k, v in r.getheaders()}, json.loads(raw)
        return self.answer


def finish(pending: list[Pending]) -> None:
    """Read every answer at once, so `finished_at` orders them as the node did."""
    threads = [threading.Thread(target=p.result) for p in pending]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def gen(n: int = 20) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "tell me", "stream": False, "options": {"num_predict": n}}


def send(node: NodeProc, tenant: str | None = None, priority: str | None = None, path: str = "/api/generate",
         body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Pending:
    h = dict(headers or {})
    if tenant is not None:
        h["X-Tenant"] = tenant
    if priority is not None:
        h["X-Priority"] = priority
    return Pending(node, path, body or gen(), h)


def queue_of(node: NodeProc) -> dict[str, Any]:
    q = node.get("/api/distributed/queue")
    assert isinstance(q, dict)
    return q


def wait_queued(node: NodeProc, depth: int, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        q = queue_of(node)
        if q["queue_depth"] == depth:
            return q
        assert time.monotonic() < deadline, q
        time.sleep(0.03)


def rows(q: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for m in q["models"] if m["model"] == MODEL and m["kind"] == "generate" for r in m[kind]]


def test_a_tenant_over_its_share_gets_429_while_another_is_admitted(node: NodeProc) -> None:
    step("heavy fills the slot and its share of the queue (3 of 6)")
    heavy = [send(node, "heavy")]
    wait_queued(node, 0)
    heavy += [send(node, "heavy") for _ in range(3)]
    q = wait_queued(node, 3)
    assert [r["tenant"] for r in rows(q, "running")] == ["heavy"]

    step("heavy's next request: 429 + Retry-After, Ollama's shape and OpenAI's under /v1/")
    status, headers, body = send(node, "heavy").result()
    assert status == 429, body
    assert int(headers["Retry-After"]) >= 1
    assert "heavy" in body["error"] and "share of the queue" in body["error"]
    status, headers, body = send(node, "heavy", path="/v1/chat/completions", body={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).result()
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert body["error"]["type"] == "rate_limit_error" and "heavy" in body["error"]["message"]

    step("light is still admitted, and served before heavy's backlog")
    light = send(node, "light")
    q = wait_queued(node, 4)
    queued = rows(q, "queued")
    assert [r["position"] for r in queued] == [1, 2, 3, 4]
    order = [r["tenant"] for r in queued]
    # light was lifted to heavy's counter on arrival: a tie, which the tenant
    # with fewer requests waiting wins
    assert order == ["light", "heavy", "heavy", "heavy"], queued
    assert all(r["priority"] == "interactive" and r["age_s"] >= 0 for r in queued)
    tenants = {t["tenant"]: t for t in q["tenants"]}
    assert tenants["heavy"]["queued"] == 3 and tenants["heavy"]["running"] == 1
    assert tenants["light"]["queued"] == 1 and tenants["heavy"]["virtual_tokens"] > 0

    step("the CLI shows the same queue")
    out = subprocess.run([*CLI, "queue", "--api", node.url, "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["queue_depth"] in (3, 4) and cli["node"] == q["node"]
    text = subprocess.run([*CLI, "queue", "--api", node.url], capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and "TENANT" in text.stdout and "heavy" in text.stdout

    step("everyone admitted finishes; X-Queue-Position is the place each had on arrival")
    finish([*heavy, light])
    results = [p.result() for p in heavy]
    light_status, light_headers, light_body = light.result()
    assert all(s == 200 and b["eval_count"] == 20 for s, _, b in results)
    assert [h["X-Queue-Position"] for _, h, _ in results] == ["0", "1", "2", "3"]
    assert light_status == 200 and light_body["eval_count"] == 20
    assert light_headers["X-Queue-Position"] == "1"
    assert heavy[0].finished_at < light.finished_at < heavy[1].finished_at < heavy[2].finished_at


def test_a_full_queue_is_still_503(node: NodeProc) -> None:
    wait_queued(node, 0)
    step("six tenants fill the queue of 6 behind a running request")
    pending = [send(node, "t0")]
    wait_queued(node, 0)
    pending += [send(node, f"t{i}") for i in range(1, 7)]
    wait_queued(node, 6)
    status, headers, body = send(node, "t7").result()
    assert status == 503 and headers["Retry-After"] == "1" and "busy" in body["error"]
    assert all(p.result()[0] == 200 for p in pending)


def test_batch_waits_while_interactive_work_queues(node: NodeProc) -> None:
    wait_queued(node, 0)
    step("a running request; then a batch title request; then the user's interactive one")
    first = send(node, "someone")
    wait_queued(node, 0)
    title = send(node, "webui", "batch", body=gen(30))
    wait_queued(node, 1)
    answer = send(node, "user", "Interactive")  # case does not matter
    q = wait_queued(node, 2)
    assert [(r["tenant"], r["priority"], r["position"]) for r in rows(q, "queued")] == [
        ("user", "interactive", 1), ("webui", "batch", 2)]
    finish([first, answer, title])
    for p in (first, answer, title):
        status, headers, _ = p.result()
        assert status == 200 and "X-Queue-Position" in headers
    assert answer.finished_at < title.finished_at


@pytest.mark.parametrize("path,body", [
    ("/api/generate", gen(1)),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
])
def test_bad_priority_or_tenant_header_is_400(node: NodeProc, path: str, body: dict[str, Any]) -> None:
    for headers, needle in (({"X-Priority": "urgent"}, "X-Priority must be one of interactive, batch"),
                            ({"X-Priority": ""}, "X-Priority"),
                            ({"X-Tenant": "x" * 129}, "X-Tenant must be"),
                            ({"X-Tenant": "two words"}, "X-Tenant must be")):
        status, _, out = send(node, path=path, body=body, headers=headers).result()
        assert status == 400, (headers, out)
        msg = out["error"]["message"] if path.startswith("/v1/") else out["error"]
        assert needle in msg


def test_a_keys_name_weight_and_priority_are_its_requests(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", env=ENV)
    try:
        step("keys create with --weight and --priority")
        def create(*args: str) -> str:
            out = subprocess.run([*CLI, "keys", "create", *args, "--data-dir", str(n.data_dir)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()

        gold = create("gold", "--weight", "3")
        bg = create("indexer", "--priority", "batch")
        bad = subprocess.run([*CLI, "keys", "create", "x", "--weight", "0", "--data-dir", str(n.data_dir)],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "weight" in bad.stderr.lower()
        listed = subprocess.run([*CLI, "keys", "list", "--json", "--data-dir", str(n.data_dir)],
                                capture_output=True, text=True, timeout=60)
        keys = {k["name"]: k for k in json.loads(listed.stdout)["keys"]}
        assert keys["gold"]["weight"] == 3.0 and keys["indexer"]["priority"] == "batch"

        step("the tenant is the key's name (X-Tenant from a trusted proxy does not override it)")
        auth = {"Authorization": f"Bearer {gold}", "X-Tenant": "someone-else"}
        first = send(n, headers=auth)
        deadline = time.monotonic() + 10
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", n.api_port, timeout=30)
            conn.request("GET", "/api/distributed/queue", headers={"Authorization": f"Bearer {gold}"})
            q = json.loads(conn.getresponse().read())
            conn.close()
            if rows(q, "running"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.03)
        indexed = send(n, headers={"Authorization": f"Bearer {bg}"})
        deadline = time.monotonic() + 10
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", n.api_port, timeout=30)
            conn.request("GET", "/api/distributed/queue", headers={"Authorization": f"Bearer {gold}"})
            q = json.loads(conn.getresponse().read())
            conn.close()
            if rows(q, "queued"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.03)
        assert [(r["tenant"], r["priority"]) for r in rows(q, "running")] == [("gold", "interactive")]
        assert [(r["tenant"], r["priority"]) for r in rows(q, "queued")] == [("indexer", "batch")]
        assert first.result()[0] == 200 and indexed.result()[0] == 200
    finally:
        n.stop()


def test_streams_carry_the_queue_position(node: NodeProc) -> None:
    wait_queued(node, 0)
    first = send(node, "a")
    wait_queued(node, 0)
    results: list[tuple[int, str | None, int]] = []

    def stream() -> None:
        c = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=60)
        c.request("POST", "/api/chat", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                   "options": {"num_predict": 5}}),
                  {"Content-Type": "application/json", "X-Tenant": "b"})
        r = c.getresponse()
        lines = [json.loads(x) for x in r.read().splitlines()]
        results.append((r.status, r.getheader("X-Queue-Position"), len(lines)))

    t = threading.Thread(target=stream)
    t.start()
    t.join(60)
    assert first.result()[0] == 200
    assert results and results[0][0] == 200 and results[0][1] == "1" and results[0][2] >= 2
