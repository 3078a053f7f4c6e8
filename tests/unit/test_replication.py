"""The replication decisions (cluster/replication.py) against a fake cluster
whose peers are stores on disk and whose Raft state is a dict with the same
compare-and-set: who copies, from whom, what wins, tombstones, trimming,
migration and a dead holder replaced."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed.cluster import placement
from ollama_distributed.cluster.replication import Replicator, rank
from ollama_distributed.errors import ConflictError, DigestMismatchError, PeerUnavailableError
from ollama_distributed.models import names
from ollama_distributed.models.store import MODEL_MEDIA, Store, layer


class FakeCluster:
    """Peers are Replicators over their own stores; fetches copy files."""

    def __init__(self) -> None:
        self.peers: dict[str, Replicator] = {}
        self.alive: set[str] = set()
        self.local = ""
        self.fetched: list[tuple[str, ...]] = []
        self.corrupt: set[str] = set()
        self.leader = "a"
        self.state: dict[str, str] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.disk_free: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}

    def nodes(self) -> list[dict[str, Any]]:
        now = time.time()
        return [{"id": k, "alive": k in self.alive, "local": k == self.local,
                 "last_seen": now if k in self.alive else self.last_seen.get(k, 0.0),
                 "advert": {**r.advert_fields(), "labels": self.labels.get(k, {}),
                            "resources": {"memory_total_bytes": 1 << 34, "disk_total_bytes": 1 << 40,
                                          "disk_used_bytes": (1 << 40) - self.disk_free.get(k, 1 << 39)}}}
                for k, r in self.peers.items()]

    def status(self) -> dict[str, Any]:
        return {"role": "leader" if self.local == self.leader else "follower"}

    def catalog(self) -> dict[str, str]:
        return dict(self.state)

    async def propose_catalog(self, expect: list[tuple[str, str | None]],
                              puts: list[tuple[str, str | None]]) -> bool:
        if any(self.state.get(k) != v for k, v in expect):
            return False
        for k, v in puts:
            if v is None:
                self.state.pop(k, None)
            else:
                self.state[k] = v
        return True

    async def fetch_manifest(self, node_id: str, path: str, digest: str | None = None) -> bytes:
        if node_id not in self.alive:
            raise PeerUnavailableError(node_id)
        return (self.peers[node_id].store.manifests / path).read_bytes()

    async def fetch_blob(self, node_ids: list[str], digest: str) -> Path:
        self.fetched.append(tuple(node_ids))
        src = next((n for n in node_ids if n in self.alive), None)
        if src is None:
            raise PeerUnavailableError("no source")
        if src in self.corrupt:
            raise DigestMismatchError(f"digest mismatch from {src}")
        hexd = names.parse_digest(digest)
        dst = self.peers[self.local].store.blob_path(hexd)
        shutil.copyfile(self.peers[src].store.blob_path(hexd), dst)
        return dst

    def transfers(self) -> dict[str, Any]:
        return {"transfers": [], "totals": {}, "bandwidth_limit_bytes_per_sec": 0}


def node(tmp: Path, cluster: FakeCluster, node_id: str, replicas: int = 2) -> Replicator:
    store = Store(tmp / node_id)
    store.ensure()
    r = Replicator(store, cluster, node_id, replicas)
    r.settle_s = 0.0  # no other node copies at the same time here
    cluster.peers[node_id] = r
    cluster.alive.add(node_id)
    return r


def create(r: Replicator, model: str, payload: bytes) -> None:
    hexd, size = r.store.put_bytes(payload)
    r.store.write_manifest(names.parse(model), [layer(MODEL_MEDIA, hexd, size)], {"n": model})


async def tick(cluster: FakeCluster, r: Replicator) -> None:
    cluster.local = r.node_id
    await r.tick()


def test_rank_is_deterministic_and_a_permutation() -> None:
    ids = [f"n{i}" for i in range(7)]
    assert rank("m", "d", ids) == rank("m", "d", list(reversed(ids)))
    assert sorted(rank("m", "d", ids)) == ids
    assert len({rank(f"m{i}", "d", ids)[0] for i in range(50)}) > 3  # spread, not one favourite


async def tick_all(c: FakeCluster, nodes: dict[str, Replicator] | list[Replicator]) -> None:
    """One pass everywhere, the leader first (it writes the placement)."""
    rs = list(nodes.values()) if isinstance(nodes, dict) else nodes
    for r in sorted(rs, key=lambda r: r.node_id != c.leader):
        if r.node_id in c.alive:
            await tick(c, r)


def entry(c: FakeCluster, model: str = "m:latest") -> dict[str, Any]:
    return placement.loads(c.state)[placement.MODEL + model]


def test_the_leader_places_the_count_holder_first(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n) for n in ("a", "b", "c")}
    create(nodes["b"], "m", b"weights")
    asyncio.run(tick_all(c, nodes))
    holders = sorted(n for n, r in nodes.items() if r.store.exists("m"))
    e = entry(c)
    assert len(holders) == 2 and "b" in holders and e["assigned"] == holders and e["replicas"] == 2
    assert e["digest"] == nodes["b"].local_manifests()["m:latest"]["digest"] and e["size"] >= len(b"weights")
    other = next(n for n in nodes if n not in holders)
    assert nodes[holders[0]].store.manifest_path(names.parse("m")).read_bytes() == \
        nodes[holders[1]].store.manifest_path(names.parse("m")).read_bytes()
    step_count = len(c.fetched)
    asyncio.run(tick_all(c, nodes))
    assert len(c.fetched) == step_count and not nodes[other].store.exists("m")
    assert sorted(entry(c)["holders"]) == holders  # the catalogue follows the adverts
    # a follower never writes the placement on its own
    c.state.clear()
    asyncio.run(tick(c, nodes["b"]))
    assert c.state == {}


def test_a_dead_holder_is_replaced_after_the_grace(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n) for n in ("a", "b", "c")}
    create(nodes["a"], "m", b"w")
    asyncio.run(tick_all(c, nodes))
    dead = next(n for n in entry(c)["assigned"] if n != "a")
    spare = next(n for n in nodes if n not in entry(c)["assigned"])
    c.alive.discard(dead)
    c.last_seen[dead] = time.time()  # just gone: keeps its assignment
    asyncio.run(tick_all(c, nodes))
    assert dead in entry(c)["assigned"] and not nodes[spare].store.exists("m")
    c.last_seen[dead] = time.time() - placement.DOWN_GRACE_S - 1
    asyncio.run(tick_all(c, nodes))
    assert nodes[spare].store.exists("m") and sorted(entry(c)["assigned"]) == sorted(["a", spare])
    # it comes back holding an extra copy, which it drops: the count is met
    c.alive.add(dead)
    asyncio.run(tick_all(c, nodes))
    assert not nodes[dead].store.exists("m") and nodes[dead].trimmed_total == 1


def test_migrate_moves_the_copy_then_the_source_drops_it(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n, replicas=1) for n in ("a", "b", "c")}
    create(nodes["a"], "m", b"w")
    asyncio.run(tick_all(c, nodes))
    assert entry(c)["assigned"] == ["a"] and not nodes["b"].store.exists("m")
    c.local = "c"  # asked at a node that holds nothing
    with pytest.raises(ConflictError, match="not assigned"):
        asyncio.run(nodes["c"].migrate("m:latest", "b", "c"))
    with pytest.raises(ConflictError, match="unknown node"):
        asyncio.run(nodes["c"].migrate("m:latest", "a", "zz"))
    c.labels = {"b": {"gpu": "yes"}}
    asyncio.run(nodes["c"].set_policy("m:latest", None, {"gpu": "yes"}))
    asyncio.run(tick_all(c, nodes))
    assert entry(c)["assigned"] == ["b"]  # the policy moved it to the only labelled node
    assert nodes["b"].store.exists("m")
    asyncio.run(tick_all(c, nodes))
    assert not nodes["a"].store.exists("m")
    with pytest.raises(ConflictError, match="label gpu=yes missing"):
        asyncio.run(nodes["c"].migrate("m:latest", "b", "c"))
    asyncio.run(nodes["c"].set_policy("m:latest", None, {}))
    out = asyncio.run(nodes["c"].migrate("m:latest", "b", "c"))
    assert out["assigned"] == ["c"]
    asyncio.run(tick_all(c, nodes))
    asyncio.run(tick_all(c, nodes))
    assert nodes["c"].store.exists("m") and not nodes["b"].store.exists("m")
    asyncio.run(tick_all(c, nodes))  # the holders follow the adverts one pass later
    assert entry(c)["assigned"] == ["c"] and entry(c)["holders"] == ["c"]


def test_the_bundled_model_and_a_busy_one_are_never_dropped(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n, replicas=1) for n in ("a", "b")}
    for r in nodes.values():
        r.keep = "base:latest"
        create(r, "base", b"bundled")
    create(nodes["b"], "busy", b"x")
    create(nodes["a"], "busy", b"x")
    nodes["a"].in_use = lambda name: name == "busy:latest"
    nodes["b"].in_use = nodes["a"].in_use
    asyncio.run(tick_all(c, nodes))
    asyncio.run(tick_all(c, nodes))
    assert all(r.store.exists("base") and r.store.exists("busy") for r in nodes.values())


def test_rebalance_spreads_and_a_full_disk_is_not_chosen(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n, replicas=1) for n in ("a", "b", "c")}
    c.disk_free["c"] = 1024  # no room for anything
    for i in range(4):
        create(nodes["a"], f"m{i}", bytes([i]) * (1000 + i))
    asyncio.run(tick_all(c, nodes))
    assert all(entry(c, f"m{i}:latest")["assigned"] == ["a"] for i in range(4))
    c.local = "b"
    dry = asyncio.run(nodes["b"].rebalance(dry_run=True))
    assert dry["moves"] and not dry["committed"] and all(entry(c, f"m{i}:latest")["assigned"] == ["a"]
                                                         for i in range(4))
    out = asyncio.run(nodes["b"].rebalance())
    assert out["committed"] and {m["model"] for m in out["moves"]} <= {f"m{i}:latest" for i in range(4)}
    for _ in range(2):
        asyncio.run(tick_all(c, nodes))
    where = {i: entry(c, f"m{i}:latest")["assigned"] for i in range(4)}
    assert sorted(len([i for i in where if where[i] == [n]]) for n in ("a", "b")) == [2, 2], where
    assert not any(nodes["c"].store.exists(f"m{i}") for i in range(4))
    for i, (n,) in where.items():
        assert nodes[n].store.exists(f"m{i}") and all(not r.store.exists(f"m{i}") for k, r in nodes.items()
                                                        if k != n)
    with pytest.raises(Exception, match="not found"):
        asyncio.run(nodes["b"].rebalance("nope:latest"))


def test_a_delete_anywhere_and_a_copy_of_a_remote_model(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n, replicas=1) for n in ("a", "b")}
    create(nodes["a"], "m", b"w")
    asyncio.run(tick_all(c, nodes))
    c.local = "b"
    assert nodes["b"].known("m:latest") and not nodes["b"].known("other:latest")
    asyncio.run(nodes["b"].fetch_now("m:latest"))
    assert nodes["b"].store.exists("m")
    with pytest.raises(Exception, match="not found"):
        asyncio.run(nodes["b"].fetch_now("other:latest"))


def test_newest_version_wins_and_a_tombstone_removes_older_copies(tmp_path: Path) -> None:
    c = FakeCluster()
    a, b = node(tmp_path, c, "a"), node(tmp_path, c, "b")
    create(a, "m", b"v1")
    asyncio.run(tick_all(c, [a, b]))
    assert b.store.exists("m")
    time.sleep(0.02)
    create(a, "m", b"v2")  # a newer version at a
    asyncio.run(tick_all(c, [a, b]))
    assert b.local_manifests()["m:latest"]["digest"] == a.local_manifests()["m:latest"]["digest"]
    assert entry(c)["digest"] == a.local_manifests()["m:latest"]["digest"]
    a.store.delete("m")
    a.record_delete("m")
    asyncio.run(tick(c, b))
    assert not b.store.exists("m") and b.deleted_total == 1
    assert "m:latest" in b.tombstones
    asyncio.run(tick(c, a))  # a does not take it back from anyone; the entry goes
    assert not a.store.exists("m") and placement.MODEL + "m:latest" not in c.state
    time.sleep(0.02)
    create(b, "m", b"v3")  # created again later: wins over the tombstone
    asyncio.run(tick(c, a))
    assert a.store.exists("m")


def test_a_bad_source_is_skipped_and_a_failed_version_backs_off(tmp_path: Path) -> None:
    c = FakeCluster()
    a, b, d = node(tmp_path, c, "a", 3), node(tmp_path, c, "b", 3), node(tmp_path, c, "d", 3)
    create(a, "m", b"w")
    asyncio.run(tick(c, a))
    asyncio.run(tick(c, b))
    assert b.store.exists("m")
    c.corrupt = {"a", "b"}
    asyncio.run(tick(c, d))
    assert not d.store.exists("m") and "digest mismatch" in (d.last_error or "")
    tried = len(c.fetched)
    c.corrupt = {"a"}
    asyncio.run(tick(c, d))  # within the back-off: not tried again yet
    assert len(c.fetched) == tried
    d._failed = {}
    asyncio.run(tick(c, d))
    assert d.store.exists("m")


@pytest.mark.parametrize("hostile", [{"m": "not a dict"}, {"m": {"digest": 1}}, "list", None])
def test_hostile_adverts_are_ignored(tmp_path: Path, hostile: Any) -> None:
    c = FakeCluster()
    a = node(tmp_path, c, "a")
    c.peers["x"] = a  # placeholder so nodes() lists it
    c.alive.add("x")

    def nodes() -> list[dict[str, Any]]:
        return [{"id": "a", "alive": True, "local": True, "advert": {}},
                {"id": "x", "alive": True, "advert": {"manifests": hostile, "tombstones": hostile}}]

    c.nodes = nodes  # type: ignore[method-assign]
    asyncio.run(tick(c, a))
    assert a.catalogue == [] and a.tombstones == {} and c.state == {}


def test_copies_made_at_about_the_same_time_are_not_shuffled(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n) for n in ("a", "b", "c")}
    nodes["a"].settle_s = 0.3
    create(nodes["b"], "m", b"w")
    asyncio.run(tick_all(c, nodes))
    assert entry(c)["assigned"] == ["b"]  # settling: not copied anywhere yet
    # the same model turns up at c (a user copied the files there too)
    shutil.copytree(nodes["b"].store.root, nodes["c"].store.root, dirs_exist_ok=True)
    asyncio.run(tick_all(c, nodes))
    time.sleep(0.35)
    asyncio.run(tick_all(c, nodes))
    assert entry(c)["assigned"] == ["b", "c"] and not nodes["a"].store.exists("m")
