"""placement.plan(): memory fit, free disk, labels, spreading, stickiness,
policies, tombstones and a catalogue with garbage in it."""

from __future__ import annotations

from typing import Any

from ollama_distributed.cluster import placement
from ollama_distributed.cluster.placement import MODEL, POLICY, NodeInfo, plan

GIB = 1 << 30


def n(nid: str, *, mem: int = 64 * GIB, disk: int = 500 * GIB, labels: dict[str, str] | None = None,
      alive: bool = True, down_for: float = 0.0, holds: dict[str, tuple[str, float, int]] | None = None,
      stores: bool = True) -> NodeInfo:
    manifests = {name: {"digest": d, "path": f"r/library/{name}", "modified": t, "size": size}
                 for name, (d, t, size) in (holds or {}).items()}
    return NodeInfo(id=nid, alive=alive, down_for=down_for, memory_bytes=mem, disk_free_bytes=disk,
                    labels=labels or {}, manifests=manifests, stores=stores)


def test_memory_disk_labels_and_stores_filter_the_candidates() -> None:
    big = {"big:latest": ("d1", 1.0, 20 * GIB)}
    nodes = [n("src", holds=big), n("small", mem=8 * GIB), n("full", disk=10 * GIB),
             n("nostore", stores=False), n("ok")]
    ch = plan({}, nodes, {}, 3)
    e = ch[MODEL + "big:latest"]
    assert e is not None and e["assigned"] == ["ok", "src"] and e["unplaced"] == 1
    assert set(e["why_not"]) == {"small", "full", "nostore"}
    assert "memory" in e["why_not"]["small"] and "disk" in e["why_not"]["full"]
    # a label policy narrows it to the labelled node
    cat: dict[str, dict[str, Any]] = {POLICY + "big:latest": {"replicas": 1, "node_labels": {"gpu": "a100"}}}
    nodes[4].labels = {"gpu": "a100"}
    e = plan(cat, nodes, {}, 3)[MODEL + "big:latest"]
    assert e is not None and e["assigned"] == ["ok"] and e["replicas"] == 1 and e["unplaced"] == 0


def test_assignments_stick_until_a_node_is_down_past_the_grace() -> None:
    m = {"m:latest": ("d", 1.0, GIB)}
    nodes = [n("a", holds=m), n("b"), n("c"), n("d")]
    first = plan({}, nodes, {}, 2)
    cat: dict[str, dict[str, Any]] = {k: v for k, v in first.items() if v is not None}
    assert plan(cat, nodes, {}, 2) == {}  # nothing changes: nothing is written
    chosen = next(x for x in cat[MODEL + "m:latest"]["assigned"] if x != "a")
    for node in nodes:
        if node.id == chosen:
            node.alive, node.down_for = False, 1.0
    during = plan(cat, nodes, {}, 2).get(MODEL + "m:latest") or cat[MODEL + "m:latest"]
    assert chosen in during["assigned"]
    for node in nodes:
        if node.id == chosen:
            node.down_for = placement.DOWN_GRACE_S + 1
    e = plan(cat, nodes, {}, 2)[MODEL + "m:latest"]
    assert e is not None and chosen not in e["assigned"] and "a" in e["assigned"] and len(e["assigned"]) == 2


def test_the_newest_version_wins_and_a_tombstone_removes_the_entry() -> None:
    nodes = [n("a", holds={"m:latest": ("old", 1.0, 10)}), n("b", holds={"m:latest": ("new", 2.0, 10)})]
    e = plan({}, nodes, {}, 2)[MODEL + "m:latest"]
    assert e is not None and e["digest"] == "new" and e["holders"] == ["b"]
    cat = {MODEL + "m:latest": e}
    assert plan(cat, nodes, {"m:latest": 2.0}, 2) == {MODEL + "m:latest": None}
    assert plan(cat, nodes, {"m:latest": 1.5}, 2) == {}


def test_rebalance_spreads_by_bytes_and_keeps_holders_on_a_tie() -> None:
    models = {f"m{i}:latest": (f"d{i}", 1.0, (i + 1) * GIB) for i in range(6)}
    nodes = [n("a", holds=models), n("b"), n("c")]
    sticky = plan({}, nodes, {}, 1)
    assert all(v is not None and v["assigned"] == ["a"] for v in sticky.values())  # no transfer needed
    cat = {k: v for k, v in sticky.items() if v is not None}
    fresh = plan(cat, nodes, {}, 1, fresh=True)
    per_node: dict[str, int] = {}
    for v in {**cat, **fresh}.values():
        assert v is not None
        per_node[v["assigned"][0]] = per_node.get(v["assigned"][0], 0) + int(v["size"])
    assert set(per_node) == {"a", "b", "c"} and max(per_node.values()) <= 8 * GIB, per_node
    only = plan(cat, nodes, {}, 1, fresh=True, only="m0:latest")
    assert set(only) <= {MODEL + "m0:latest"}


def test_garbage_in_the_catalogue_or_adverts_is_skipped() -> None:
    raw = {MODEL + "x": "not json", MODEL + "y": "[1]", POLICY + "z": "{}"}
    assert set(placement.loads(raw)) == {POLICY + "z"}
    info = NodeInfo.from_node({"id": "a", "alive": True, "advert": {
        "manifests": {"m": {"digest": 1}, "ok:latest": {"digest": "d", "path": "p", "modified": "x"}},
        "labels": ["not", "a", "dict"], "resources": {"disk_total_bytes": 0}}}, 0.0)
    assert info.labels == {} and info.disk_free_bytes == -1
    assert plan({}, [info], {}, 2) == {}


def test_migrate_checks_the_target() -> None:
    e = {"digest": "d", "size": 20 * GIB, "assigned": ["a"], "holders": ["a"], "replicas": 1}
    nodes = [n("a"), n("b"), n("small", mem=GIB)]
    assert placement.migrate(e, nodes, "a", "b")["assigned"] == ["b"]
    for src, dst, why in [("b", "a", "not assigned"), ("a", "a", "same node"), ("a", "zz", "unknown node"),
                          ("a", "small", "memory")]:
        try:
            placement.migrate(e, nodes, src, dst)
        except ValueError as err:
            assert why in str(err)
        else:
            raise AssertionError(f"{src}->{dst} accepted")
