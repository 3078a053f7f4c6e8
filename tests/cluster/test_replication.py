"""Peer-to-peer model replication through real node processes on the mock
engine: a model created at A is copied to B, and to C when it joins late,
byte-identical, over QUIC; a peer whose blob is not its digest is caught and
nothing is left behind, and with a good holder too the blob comes from it; a delete at B removes the model everywhere and
replication does not bring it back; a source killed with -9 mid-transfer and
the copy resumes from the other holder; with replicas=2 of 3 a killed
holder is replaced; a placement policy with node labels, a migration and a
rebalance move copies where they are asked to, and extra ones are dropped."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import CLI, NodeProc, start_node
from .test_nodes import join_args, metric, post, step, token_of, until

pytestmark = pytest.mark.cluster

# replicas=3, no bundled model (nothing to copy at start), the mock engine.
ENV = {"OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "3", "OLLAMA_DISTRIBUTED_MODELS_DEFAULT": ""}
MODEL = "replica-test:latest"
MANIFEST = Path("manifests/registry.ollama.ai/library/replica-test/latest")


def tiny_gguf(size: int) -> bytes:
    """A valid GGUF header (llama, no tensors) followed by `size` random bytes."""
    def s(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    head += s(b"general.architecture") + struct.pack("<I", 8) + s(b"llama")
    head += s(b"general.name") + struct.pack("<I", 8) + s(b"replica-test")
    return head + os.urandom(size)


def create_model(n: NodeProc, model: str, size: int, **fields: Any) -> str:
    """Upload a GGUF of `size` random bytes to `n` and create `model` from it
    (with any other /api/create `fields`); the blob's hex digest."""
    data = tiny_gguf(size)
    hexd = hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(n.url + f"/api/blobs/sha256:{hexd}", data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 201
    post(n.url + "/api/create", {"model": model, "files": {"t.gguf": f"sha256:{hexd}"}, "stream": False,
                                 **fields})
    return hexd


def store(n: NodeProc) -> Path:
    return n.data_dir / "models"


def files_of(n: NodeProc) -> dict[str, bytes]:
    """The manifest and every blob it names, by relative path."""
    root = store(n)
    raw = (root / MANIFEST).read_bytes()
    m = json.loads(raw)
    out = {str(MANIFEST): raw}
    for layer in [m["config"], *m["layers"]]:
        rel = "blobs/" + layer["digest"].replace(":", "-")
        out[rel] = (root / rel).read_bytes()
    return out


def replication(n: NodeProc) -> dict[str, Any]:
    r: dict[str, Any] = n.get("/api/distributed/replication/status")  # type: ignore[assignment]
    return r


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, NodeProc]]:
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=ENV)
    b = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)), data_dir=tmp_path / "b", env=ENV)
    nodes = {"a": a, "b": b}
    until("a and b see each other", 20,
          lambda: all(a.get("/health")["services"]["p2p_peers"] == 1 for a in nodes.values()))  # type: ignore[index]
    yield nodes
    for n in nodes.values():
        n.stop()


def test_created_at_a_copied_to_b_and_a_late_joiner_then_deleted_everywhere(
        pair: dict[str, NodeProc], tmp_path: Path) -> None:
    a, b = pair["a"], pair["b"]
    step("upload a 6 MiB GGUF to a and create a model from it with its own system prompt")
    hexd = create_model(a, MODEL, 6 << 20, system="Be terse.")
    want = files_of(a)
    assert len(want) == 4  # manifest, config, model, system
    model_bytes = len(want[f"blobs/sha256-{hexd}"])

    step("b holds a byte-identical copy")
    took = until("the model on b", 30, lambda: (store(b) / MANIFEST).is_file())
    assert files_of(b) == want
    print(f"replicated to b in {took:.2f}s")
    rb = replication(b)
    assert rb["totals"]["bytes_in"] >= model_bytes and rb["totals"]["completed_in"] >= 3
    assert rb["models_replicated_total"] == 1 and rb["replicas"] == 3
    until("b's catalogue names both holders", 5,
          lambda: [(m["model"], len(m["holders"]), len(m["assigned"]), m["replicas"], m["unplaced"])
                   for m in replication(b)["models"]] == [(MODEL, 2, 2, 3, 0)])  # 3 wanted, only 2 nodes
    listed = {m["name"]: m for m in b.get("/api/distributed/models")["models"]}[MODEL]  # type: ignore[index]
    assert listed["replicas"] == 3 and len(listed["holders"]) == 2 and listed["manifest_digest"].startswith("sha256:")
    assert replication(a)["totals"]["bytes_out"] >= model_bytes
    assert metric(b, "ollama_distributed_replication_bytes_total", direction="in") == rb["totals"]["bytes_in"]
    assert metric(b, "ollama_distributed_replication_blobs_total", direction="in", outcome="ok") == 3
    assert not [p for p in (store(b) / "tmp").iterdir() if p.name.startswith("p2p-")]
    until("b lists the model", 10, lambda: MODEL in [m["name"] for m in b.get("/api/tags")["models"]])  # type: ignore[index]

    step("c joins late and receives its copy")
    c = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)), data_dir=tmp_path / "c", env=ENV)
    try:
        until("the model on c", 30, lambda: (store(c) / MANIFEST).is_file())
        assert files_of(c) == want

        step("delete at b: gone from a, b and c, and not brought back")
        req = urllib.request.Request(b.url + "/api/delete", data=json.dumps({"model": MODEL}).encode(),
                                     method="DELETE", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        until("the model gone everywhere", 20,
              lambda: not any((store(n) / MANIFEST).exists() for n in (a, b, c)))
        time.sleep(3)  # several replication passes
        assert not any((store(n) / MANIFEST).exists() for n in (a, b, c))
        assert replication(a)["models_deleted_total"] == 1
        assert MODEL in replication(c)["tombstones"]
        assert all(MODEL in replication(n)["cluster_tombstones"] for n in (a, b, c))  # in the Raft state
    finally:
        c.stop()


def test_a_blob_that_is_not_its_digest_is_refused(pair: dict[str, NodeProc]) -> None:
    a, b = pair["a"], pair["b"]
    step("a's disk holds a model whose blob was corrupted (the bytes are not the name)")
    good = tiny_gguf(1 << 20)
    hexd = hashlib.sha256(good).hexdigest()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    (store(a) / "blobs" / f"sha256-{hexd}").write_bytes(bytes(bad))
    cfg = b"{}"
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    (store(a) / "blobs" / f"sha256-{cfg_hex}").write_bytes(cfg)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": f"sha256:{cfg_hex}", "size": len(cfg)},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{hexd}",
                            "size": len(good)}]}
    (store(a) / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    (store(a) / MANIFEST).write_bytes(json.dumps(manifest).encode())

    step("b tries to replicate it: the digest mismatch is detected, nothing is left")
    until("b sees the mismatch", 20, lambda: replication(b)["totals"]["digest_mismatches"] >= 1)
    st = replication(b)
    assert "digest mismatch" in (st["last_error"] or ""), st
    assert not (store(b) / "blobs" / f"sha256-{hexd}").exists()
    assert not (store(b) / MANIFEST).exists()
    assert not [p for p in (store(b) / "tmp").iterdir() if p.name.startswith("p2p-")]


def test_a_holder_killed_mid_transfer_the_copy_resumes_from_the_other(
        pair: dict[str, NodeProc], tmp_path: Path) -> None:
    a, b = pair["a"], pair["b"]
    step("a 64 MiB model on a and b; c joins with a 128 Mbit/s cap and fetches half from each")
    create_model(a, MODEL, 64 << 20)
    want = files_of(a)
    until("the model on b", 30, lambda: (store(b) / MANIFEST).is_file())
    ids = {a.get("/api/distributed/status")["node_id"]: a, b.get("/api/distributed/status")["node_id"]: b}  # type: ignore[index]
    c = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)), data_dir=tmp_path / "c",
                   env={**ENV, "OLLAMA_DISTRIBUTED_MODELS_REPLICATION_BANDWIDTH_MBPS": "128"})
    try:
        seen: dict[str, Any] = {}

        def big_transfer_under_way() -> bool:
            for t in replication(c)["transfers"]:
                # each source has sent at most half of this plus its 8 MiB stream
                # window: well short of its 32 MiB range
                if t["direction"] == "in" and t["total"] > (60 << 20) and t["bytes"] > (16 << 20):
                    seen.update(t)
                    return True
            return False

        until("c's copy under way", 30, big_transfer_under_way)
        assert seen["bytes"] < (24 << 20), seen
        victim = seen["peer"].split("+")[0]  # "x+y": a range from each holder at once
        source = ids[victim]
        step(f"kill -9 one source ({victim}) at {seen['bytes']} of {seen['total']} bytes")
        source.stop(signal.SIGKILL)
        until("the model on c", 60, lambda: (store(c) / MANIFEST).is_file())
        assert files_of(c) == want
        st = replication(c)
        # its range refetched from the other; or, when c was connected to one
        # holder only as it began, the single-source partial resumed from the other
        assert st["totals"]["ranges_refetched"] + st["totals"]["failed_in"] == 1, st["totals"]
        # resumed, not restarted: every blob byte crossed once
        assert st["totals"]["bytes_in"] == sum(len(v) for k, v in want.items() if k.startswith("blobs/")), st
    finally:
        c.stop()


def test_replicas_2_of_3_and_the_count_restored_after_kill_9(tmp_path: Path) -> None:
    env = {**ENV, "OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "2"}
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=env)
    token = token_of(a)
    b = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "b", env=env)
    c = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "c", env=env)
    nodes = [a, b, c]
    try:
        until("three nodes connected", 20,
              lambda: all(n.get("/health")["services"]["p2p_peers"] == 2 for n in nodes))  # type: ignore[index]
        step("create at a with replicas=2: exactly one of b and c takes a copy")
        create_model(a, MODEL, 2 << 20)
        want = files_of(a)

        def holders() -> list[NodeProc]:
            return [n for n in nodes if n.proc.poll() is None and (store(n) / MANIFEST).is_file()]

        until("two copies", 20, lambda: len(holders()) == 2)
        time.sleep(3)  # several passes: no third copy
        assert len(holders()) == 2
        other = next(n for n in holders() if n is not a)
        spare = next(n for n in (b, c) if n is not other)
        step("kill -9 the other holder: the spare restores the count")
        other.stop(signal.SIGKILL)
        until("the spare's copy", 30, lambda: (store(spare) / MANIFEST).is_file())
        assert files_of(spare) == want
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.stop()


def node_id(n: NodeProc) -> str:
    return str(n.get("/api/distributed/status")["node_id"])  # type: ignore[index]


def call(n: NodeProc, path: str, body: Any, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(n.url + path, data=raw if raw is not None else json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_labels_migrate_and_rebalance_move_the_copies(tmp_path: Path) -> None:
    env = {**ENV, "OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "1"}
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=env)
    token = token_of(a)
    b = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "b", env=env)
    c = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "c",
                   env={**env, "OLLAMA_DISTRIBUTED_NODE_LABELS": "gpu=yes,zone=r1"})
    nodes = [a, b, c]
    try:
        until("three nodes connected", 20,
              lambda: all(n.get("/health")["services"]["p2p_peers"] == 2 for n in nodes))  # type: ignore[index]
        ids = {node_id(n): n for n in nodes}
        ia, ib, ic = node_id(a), node_id(b), node_id(c)

        def holders() -> set[str]:
            return {i for i, n in ids.items() if (store(n) / MANIFEST).is_file()}

        def entry(n: NodeProc) -> dict[str, Any]:
            found: dict[str, Any] = next((m for m in replication(n)["models"] if m["model"] == MODEL), {})
            return found

        step("create at a with replicas=1: a keeps the only copy")
        create_model(a, MODEL, 3 << 20)
        want = files_of(a)
        until("the catalogue at b", 10, lambda: entry(b).get("assigned") == [ia] and entry(b).get("holders") == [ia])
        time.sleep(2)
        assert holders() == {ia}

        step("a policy wanting gpu=yes (asked at b): the copy moves to c, a drops its own")
        status, out = call(b, "/api/distributed/placement", {"model": MODEL, "node_labels": {"gpu": "yes"}})
        assert status == 200 and out["node_labels"] == {"gpu": "yes"}, out
        until("the copy on c only", 30, lambda: holders() == {ic})
        assert files_of(c) == want
        assert entry(a)["assigned"] == [ic] and entry(a)["node_labels"] == {"gpu": "yes"}
        assert metric(a, "ollama_distributed_replication_trims_total") == 1
        assert metric(a, "ollama_distributed_replication_deletes_total") == 0
        assert metric(a, "ollama_distributed_replication_copies_unplaced") == 0

        step("migrate to b: refused while the policy wants a label b lacks")
        status, out = call(a, "/api/distributed/migrate", {"model": MODEL, "from": ic, "to": ib})
        assert status == 409 and "gpu=yes" in out["error"], out
        for bad, code in [({"model": "nope", "from": ic, "to": ib}, 404),
                          ({"model": "../../etc/passwd", "from": ic, "to": ib}, 400),
                          ({"model": MODEL, "from": ic}, 400),
                          ({"model": MODEL, "from": ic, "to": "no-such-node"}, 409),
                          ({"model": MODEL, "from": ia, "to": ib}, 409)]:
            status, out = call(a, "/api/distributed/migrate", bad)
            assert status == code and out["error"], (bad, status, out)
        assert call(a, "/api/distributed/migrate", None, raw=b"{not json")[0] == 400
        assert call(a, "/api/distributed/placement", {"model": MODEL, "replicas": 0})[0] == 400

        step("the policy lifted, migrate c -> b: b fetches, then c drops its copy")
        assert call(b, "/api/distributed/placement", {"model": MODEL, "node_labels": {}})[0] == 200
        status, out = call(a, "/api/distributed/migrate", {"model": MODEL, "from": ic, "to": ib})
        assert status == 202 and out["assigned"] == [ib], out
        until("the copy on b only", 30, lambda: holders() == {ib})
        assert files_of(b) == want

        step("copy at a, which does not hold it: a fetches it first; delete at c, which holds neither")
        post(a.url + "/api/copy", {"source": MODEL, "destination": "copied-here"})
        copied = Path("manifests/registry.ollama.ai/library/copied-here/latest")
        assert (store(a) / copied).is_file() and (store(a) / MANIFEST).is_file()
        req = urllib.request.Request(c.url + "/api/delete", data=json.dumps({"model": "copied-here"}).encode(),
                                     method="DELETE", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        until("the copy gone from a", 20, lambda: not (store(a) / copied).exists())
        req = urllib.request.Request(c.url + "/api/delete", data=json.dumps({"model": "never-was"}).encode(),
                                     method="DELETE", headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("a delete of a model nobody has answered 200")
        except urllib.error.HTTPError as e:
            assert e.code == 404
        until("a's extra copy of the model dropped", 20, lambda: holders() == {ib})

        step("replicas 3 by policy: every node holds it; rebalance has nothing to move")
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*CLI, "cluster", *args, "--api", c.url], capture_output=True, text=True,
                                  timeout=60)

        r = cli("place", MODEL, "--replicas", "3")
        assert r.returncode == 0 and "3 copies on any node" in r.stdout, r
        until("three copies", 30, lambda: holders() == {ia, ib, ic})
        r = cli("rebalance", "--dry-run", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["moves"] == [], r
        r = cli("migrate", MODEL, ia, "no-such-node")
        assert r.returncode == 1 and "unknown node" in r.stderr, r
        r = cli("place", MODEL, "--label", "novalue")
        assert r.returncode == 2 and "KEY=VALUE" in r.stderr, r
        status, out = call(c, "/api/distributed/rebalance", {"model": "nope"})
        assert status == 404, out
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.stop()


def test_a_corrupt_holder_is_caught_and_the_blob_comes_from_the_good_one(tmp_path: Path) -> None:
    holder = {**ENV, "OLLAMA_DISTRIBUTED_NODE_LABELS": "holder=yes"}
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=holder)
    token = token_of(a)
    c = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "c", env=holder)
    b = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "b", env=ENV)
    nodes = [a, b, c]
    try:
        until("three nodes connected", 20,
              lambda: all(n.get("/health")["services"]["p2p_peers"] == 2 for n in nodes))  # type: ignore[index]
        step("a 24 MiB model kept on the holder=yes nodes (a and c); then a's copy of the big blob rots")
        assert call(a, "/api/distributed/placement",
                    {"model": MODEL, "replicas": 2, "node_labels": {"holder": "yes"}})[0] == 200
        hexd = create_model(c, MODEL, 24 << 20)
        want = files_of(c)
        until("a's copy", 30, lambda: (store(a) / MANIFEST).is_file())
        assert not (store(b) / MANIFEST).exists()
        rotten = store(a) / "blobs" / f"sha256-{hexd}"
        with open(rotten, "r+b") as f:
            for at in (5 << 20, 20 << 20):  # in either half, whichever range a serves
                f.seek(at)
                byte = f.read(1)
                f.seek(at)
                f.write(bytes([byte[0] ^ 0xFF]))

        step("the label policy goes: b is placed and copies in ranges from a and c; the whole fails its "
             "digest, each holder alone follows, and c's copy is good")
        assert call(a, "/api/distributed/placement", {"model": MODEL, "replicas": 3, "node_labels": {}})[0] == 200
        until("b's copy", 60, lambda: (store(b) / MANIFEST).is_file())
        assert files_of(b) == want
        st = replication(b)
        assert st["totals"]["digest_mismatches"] >= 1, st["totals"]
        assert not [p for p in (store(b) / "tmp").iterdir() if p.name.startswith("p2p-")]
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.stop()
