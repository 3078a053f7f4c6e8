"""Prefix-aware routing through real node processes (issue 12, routing).

a holds no model and takes the requests under `prefix_aware` (set in its YAML
file); b and c hold the model on the mock engine, and b routes under
`round_robin` (set in its environment). A tenant's requests through a all land
on one worker, advert after advert (a cannot render the prompt and routes on
the messages; the worker advertises both texts); concurrent ones spread to the
second worker when the first is over its load bound, and a's counter says so; through b, round robin alternates."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

import pytest

from ..conftest import MODEL, NodeProc, start_node
from .test_migration import ENTRY, MOCK, stop_all
from .test_nodes import join_args, metric, post, status, step, token_of, until

pytestmark = pytest.mark.cluster

SYSTEM = "You are the billing assistant of tenant {t}. Answer from the invoice rules. " * 30


def ask(n: NodeProc, tenant: int, question: str, tokens: int = 2) -> dict[str, Any]:
    body = {"model": MODEL, "stream": False, "options": {"num_predict": tokens},
            "messages": [{"role": "system", "content": SYSTEM.format(t=tenant)},
                         {"role": "user", "content": question}]}
    req = urllib.request.Request(n.url + "/api/chat", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def served(n: NodeProc) -> float:
    return metric(n, "ollama_distributed_requests_total", endpoint="peer:chat", model=MODEL)


def served_since(trio: dict[str, NodeProc], before: dict[str, float], total: int) -> dict[str, float]:
    """Requests b and c served since `before`, once all `total` are counted
    (a worker counts a request after its last chunk went out)."""
    def got() -> dict[str, float]:
        return {k: served(trio[k]) - before[k] for k in ("b", "c")}
    until(f"{total} requests counted", 20, lambda: sum(got().values()) == total)
    return got()


def decisions(n: NodeProc, reason: str) -> float:
    return metric(n, "ollama_distributed_routing_decisions_total", reason=reason)


def holders_seen(entry: NodeProc, ids: set[str]) -> bool:
    alive = {x["id"] for x in entry.get("/api/distributed/nodes")["nodes"]  # type: ignore[index]
             if x["status"] == "active"}
    models = entry.get("/api/distributed/models")["models"]  # type: ignore[index]
    held = {n for m in models if m["name"] == MODEL for n in m["nodes"]}
    return ids <= alive and ids <= held


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("prefix")
    step("start a (no model, prefix_aware from its YAML file), b (round_robin from the environment) and c")
    conf = tmp / "a.yaml"
    conf.write_text("scheduler:\n  policy: prefix_aware\n")
    a = start_node(tmp, "--config", str(conf), data_dir=tmp / "a",
                   env={**MOCK, **ENTRY, "OLLAMA_DISTRIBUTED_NODE_LABELS": ""})
    token = token_of(a)
    b = start_node(tmp, *join_args(a, token), data_dir=tmp / "b",
                   env={**MOCK, "OLLAMA_DISTRIBUTED_SCHEDULER_POLICY": "round_robin"})
    c = start_node(tmp, *join_args(a, token), data_dir=tmp / "c", env=MOCK)
    nodes = {"a": a, "b": b, "c": c}
    post(a.url + "/api/distributed/placement", {"model": MODEL, "replicas": 2, "node_labels": {"role": "worker"}})
    ids = {status(b)["node_id"], status(c)["node_id"]}
    until("a and b see b and c alive, both holding the model", 60,
          lambda: holders_seen(a, ids) and holders_seen(b, ids))
    time.sleep(1.5)  # the schedulers take the adverts they have seen once a second
    yield nodes
    stop_all(nodes)


def test_a_tenant_sticks_to_one_worker_across_adverts(trio: dict[str, NodeProc]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    before = {k: served(trio[k]) for k in ("b", "c")}
    hits = decisions(a, "prefix_hit")
    step("6 requests of tenant 1 through a, one at a time, an advert period or two apart")
    for q in range(6):
        ask(a, 1, f"question {q}?")
        time.sleep(0.8)
    got = served_since(trio, before, 6)
    print("tenant 1 served by", got)
    assert sorted(got.values()) == [0, 6], got
    assert decisions(a, "prefix_hit") - hits >= 5
    home = "b" if got["b"] else "c"

    step("load the model on the other worker too; tenant 2 goes there (less cached), and sticks there")
    other = trio["c" if home == "b" else "b"]
    post(other.url + "/api/generate", {"model": MODEL})  # an empty request loads the model where it is sent
    time.sleep(2.5)  # a sees it loaded in the next advert
    before = {k: served(trio[k]) for k in ("b", "c")}
    for q in range(3):
        ask(a, 2, f"question {q}?")
    got = served_since(trio, before, 3)
    print("tenant 2 served by", got)
    assert got[home] == 0 and sum(got.values()) == 3, got
    del b, c


def test_a_busy_warm_worker_spreads_the_prefix_to_the_other(trio: dict[str, NodeProc]) -> None:
    a = trio["a"]
    ask(a, 3, "warm up")  # tenant 3 is warm on one worker now
    before = {k: served(trio[k]) for k in ("b", "c")}
    spread = decisions(a, "spread")
    step("three long requests of tenant 3 at once: the third finds the warm worker over the load bound")
    # CHWBL's bound over two idle workers: ceil(1.25 × 3/2) = 2 requests each
    threads = [threading.Thread(target=ask, args=(a, 3, f"long {i}", 150)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.2)  # each is running (150 tokens at 25/s: 6 s, even on a busy CPU) when the next is routed
    for t in threads:
        t.join(60)
    got = served_since(trio, before, 3)
    print("tenant 3 served by", got, "spread:", decisions(a, "spread") - spread)
    assert sorted(got.values()) == [1, 2], got
    assert decisions(a, "spread") - spread == 1


def test_round_robin_from_the_environment_alternates(trio: dict[str, NodeProc]) -> None:
    b, c = trio["b"], trio["c"]
    before = served(c)
    step("4 requests of one tenant through b (round_robin): 2 run on b, 2 on c")
    for q in range(4):
        ask(b, 4, f"question {q}?")
    until("c counted its 2", 10, lambda: served(c) - before >= 2)
    time.sleep(0.5)
    assert served(c) - before == 2
    assert decisions(b, "prefix_hit") + decisions(b, "load") + decisions(b, "spread") >= 4
