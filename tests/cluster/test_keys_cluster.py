"""API keys across a cluster of three real node processes (mock engine): the
joiners get the token from a file and from $OLLAMA_DISTRIBUTED_TOKEN (never the
command line); a key made at one node works at every node; a revoke at another
is in force everywhere within a second; a per-key limit is shared, so three
entry nodes together admit at most a bounded overshoot over it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import psutil
import pytest

from ..conftest import NodeProc, start_node
from ..integration.test_security import bearer, cli, create_key, request
from .test_nodes import converged, step, token_of, until


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProc]]:
    tmp = tmp_path_factory.mktemp("keys3")
    step("start a; b joins with --token-file, c with $OLLAMA_DISTRIBUTED_TOKEN")
    a = start_node(tmp, "--engine", "mock", data_dir=tmp / "a")
    token = token_of(a)
    (tmp / "token").write_text(token + "\n")
    join = ["--join", f"127.0.0.1:{a.p2p_port}", "--engine", "mock"]
    b = start_node(tmp, *join, "--token-file", str(tmp / "token"), data_dir=tmp / "b")
    c = start_node(tmp, *join, data_dir=tmp / "c", env={"OLLAMA_DISTRIBUTED_TOKEN": token})
    nodes = {"a": a, "b": b, "c": c}
    try:
        until("three nodes, one leader", 30, lambda: converged(list(nodes.values()), 3))
        for n in (b, c):
            assert token not in " ".join(psutil.Process(n.proc.pid).cmdline())  # not in `ps`
            assert "shows the join token" not in n.log()
        yield nodes
    finally:
        for n in nodes.values():
            n.stop()


def status_of(n: NodeProc, key: str | None = None) -> int:
    return request(n.api_port, "GET", "/api/tags", headers=bearer(key) if key else {})[0]


def test_a_key_works_everywhere_and_a_revoke_reaches_every_node(trio: dict[str, NodeProc]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    step("create a key at a")
    key = create_key(a, "everywhere", "--role", "admin")
    keeper_key = create_key(a, "keeper")  # the last key's revoke would open the API again
    until("the key is in force at every node", 5,
          lambda: all(status_of(n) == 401 and status_of(n, key) == 200 for n in (a, b, c)))
    listed = json.loads(cli("keys", "list", "--json", "--data-dir", str(c.data_dir)).stdout)
    assert [k["name"] for k in listed["keys"]] == ["everywhere", "keeper"]

    step("a key used only at c shows as used in `keys list` at a")
    keeper = {k["name"]: k for k in json.loads(cli("keys", "list", "--json", "--data-dir",
                                                   str(a.data_dir)).stdout)["keys"]}["keeper"]
    assert keeper["last_used"] is None
    t_used = time.time()
    assert status_of(c, keeper_key) == 200

    def used_at_a() -> bool:
        rows = json.loads(cli("keys", "list", "--json", "--data-dir", str(a.data_dir)).stdout)["keys"]
        t = {k["name"]: k for k in rows}["keeper"]["last_used"]
        return t is not None and t >= t_used - 1
    until("a's list shows c's use", 5, used_at_a)

    step("revoke it at b")
    r = cli("keys", "revoke", "everywhere", "--data-dir", str(b.data_dir))
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    until("refused at every node", 5, lambda: all(status_of(n, key) == 401 for n in (a, b, c)))
    took = time.monotonic() - t0
    print(f"revoke in force at all three nodes after {took:.2f} s")
    assert took < 1.0


def test_a_limit_is_shared_by_the_entry_nodes(trio: dict[str, NodeProc]) -> None:
    a, b, c = trio["a"], trio["b"], trio["c"]
    rpm = 20
    key = create_key(a, "shared", "--rpm", str(rpm))
    time.sleep(1.0)  # every node reads the keys twice a second (security/keys.py REFRESH_S)

    step(f"spend a's share of the {rpm} requests")
    spent = 0
    while status_of(a, key) == 200:
        spent += 1
        assert spent <= rpm
    assert int(rpm / 3) <= spent <= int(rpm / 3) + 1, spent  # each of three nodes bursts a third

    step("b and c learn it from a's advert within about a second")
    until("b and c refuse the key too", 3, lambda: status_of(b, key) == 429 and status_of(c, key) == 429)

    step("a burst over all three entry nodes at once: the overshoot is bounded")
    burst = create_key(a, "burst", "--rpm", str(rpm))
    time.sleep(1.0)
    t0 = time.monotonic()
    admitted = 0
    while time.monotonic() - t0 < 5:
        for n in (a, b, c):
            if request(n.api_port, "GET", "/api/version", headers=bearer(burst))[0] == 200:
                admitted += 1
        time.sleep(0.01)
    window = time.monotonic() - t0
    ideal = rpm + rpm * window / 60
    print(f"rpm {rpm}, three entry nodes, {window:.1f} s: {admitted} admitted, ideal {ideal:.0f}, "
          f"overshoot {admitted / ideal:.2f}x")
    # Each node bursts a third of the allowance and hears of the others' use
    # one advert (~1 s) later: the allowance, the refill, and what the other
    # two admit from their refill before they hear.
    assert rpm / 3 <= admitted <= rpm + 3 * rpm * window / 60 + 3, admitted
