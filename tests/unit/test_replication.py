"""The replication decisions (cluster/replication.py) against a fake cluster
whose peers are stores on disk: who copies, from whom, what wins, tombstones."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed.cluster.replication import Replicator, rank
from ollama_distributed.errors import DigestMismatchError, PeerUnavailableError
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

    def nodes(self) -> list[dict[str, Any]]:
        return [{"id": k, "alive": k in self.alive, "local": k == self.local,
                 "advert": r.advert_fields()} for k, r in self.peers.items()]

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


def test_the_count_is_met_by_the_ranked_nodes_only(tmp_path: Path) -> None:
    c = FakeCluster()
    nodes = {n: node(tmp_path, c, n) for n in ("a", "b", "c")}
    create(nodes["a"], "m", b"weights")
    for r in nodes.values():
        asyncio.run(tick(c, r))
    holders = sorted(n for n, r in nodes.items() if r.store.exists("m"))
    assert len(holders) == 2 and "a" in holders
    digest = nodes["a"].local_manifests()["m:latest"]["digest"]
    chosen = next(n for n in rank("m:latest", digest, ["a", "b", "c"]) if n != "a")
    assert holders == sorted(["a", chosen])
    other = next(n for n in ("b", "c") if n not in holders)
    b = nodes[holders[1]]
    assert b.store.manifest_path(names.parse("m")).read_bytes() == \
        nodes["a"].store.manifest_path(names.parse("m")).read_bytes()
    step_count = len(c.fetched)
    asyncio.run(tick(c, nodes[other]))
    assert len(c.fetched) == step_count and not nodes[other].store.exists("m")


def test_newest_version_wins_and_a_tombstone_removes_older_copies(tmp_path: Path) -> None:
    c = FakeCluster()
    a, b = node(tmp_path, c, "a"), node(tmp_path, c, "b")
    create(a, "m", b"v1")
    asyncio.run(tick(c, b))
    assert b.store.exists("m")
    time.sleep(0.02)
    create(a, "m", b"v2")  # a newer version at a
    asyncio.run(tick(c, b))
    assert b.local_manifests()["m:latest"]["digest"] == a.local_manifests()["m:latest"]["digest"]
    a.store.delete("m")
    a.record_delete("m")
    asyncio.run(tick(c, b))
    assert not b.store.exists("m") and b.deleted_total == 1
    assert "m:latest" in b.tombstones
    asyncio.run(tick(c, a))  # a does not take it back from anyone
    assert not a.store.exists("m")
    time.sleep(0.02)
    create(b, "m", b"v3")  # created again later: wins over the tombstone
    asyncio.run(tick(c, a))
    assert a.store.exists("m")


def test_a_bad_source_is_skipped_and_a_failed_version_backs_off(tmp_path: Path) -> None:
    c = FakeCluster()
    a, b, d = node(tmp_path, c, "a", 3), node(tmp_path, c, "b", 3), node(tmp_path, c, "d", 3)
    create(a, "m", b"w")
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
    assert a.catalogue == [] and a.tombstones == {}
