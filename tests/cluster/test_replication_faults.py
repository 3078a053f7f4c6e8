"""Peer replication onto a node whose disk fills up, through real node
processes on the mock engine: the receiving node's data dir is a small tmpfs
(mounted here; these tests run as root, as CI does), and the disk is filled
while a copy is under way. The copy fails with an error that says the disk is
full (replication status and the log), nothing of the model is visible, the
partial file is removed so its space comes back, the node keeps serving what
it has, and once space is freed the copy completes. Once from one holder, and
once in ranges from two holders at once (`.ranges`, rust/blobs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import NodeProc, start_node
from .test_nodes import join_args, post, step, token_of, until
from .test_replication import ENV, replication, store
from .test_replication import create_model as create

pytestmark = pytest.mark.cluster

SMALL, BIG = "small-test:latest", "big-test:latest"
# Room for the big model plus placement's 256 MiB headroom; the filler takes the rest.
DISK = "384m"
BIG_SIZE = 40 << 20  # at least 16 MiB: from two holders it comes in ranges
# the receiver is slowed (64 Mbit/s, about 5 s for the big model) so the disk
# can be filled while the copy runs
SLOW = {**ENV, "OLLAMA_DISTRIBUTED_MODELS_REPLICATION_BANDWIDTH_MBPS": "64"}
MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def manifest_of(model: str) -> Path:
    name, tag = model.split(":")
    return Path("manifests/registry.ollama.ai/library") / name / tag


def files_of(n: NodeProc, model: str) -> dict[str, bytes]:
    """The manifest and every blob it names, by relative path."""
    root = store(n)
    raw = (root / manifest_of(model)).read_bytes()
    m = json.loads(raw)
    out = {str(manifest_of(model)): raw}
    for layer in [m["config"], *m["layers"]]:
        rel = "blobs/" + layer["digest"].replace(":", "-")
        out[rel] = (root / rel).read_bytes()
    return out


def fill(mnt: Path, name: str = "filler", leave: int = 0) -> Path:
    """Take every free byte of the file system but `leave`."""
    path = mnt / name
    with open(path, "wb", buffering=0) as f:
        chunk = bytes(MiB)
        try:
            while shutil.disk_usage(mnt).free >= leave + MiB:
                f.write(chunk)
            if not leave:
                f.write(chunk)  # the last bytes: ENOSPC
        except OSError:
            pass
    assert leave <= shutil.disk_usage(mnt).free < leave + MiB
    return path


def used_without(mnt: Path, filler: Path) -> int:
    return shutil.disk_usage(mnt).used - filler.stat().st_blocks * 512


def p2p_files(n: NodeProc) -> list[str]:
    return sorted(p.name for p in (store(n) / "tmp").iterdir() if p.name.startswith("p2p-"))


def tags(n: NodeProc) -> dict[str, Any]:
    """/api/tags by name: `n`'s own models, and the ones only peers hold
    (details.remote_node: served through that peer)."""
    return {m["name"]: m for m in n.get("/api/tags")["models"]}  # type: ignore[index]


def local(n: NodeProc, model: str) -> bool:
    """`n` holds `model` itself: in its store and listed as its own."""
    m = tags(n).get(model)
    return m is not None and "remote_node" not in m["details"] and (store(n) / manifest_of(model)).is_file()


def transfer_in(n: NodeProc, hexd: str, *, ranges: bool) -> dict[str, Any] | None:
    """The copy of blob `hexd` under way into `n` (from several peers at once
    when `ranges`), once 8 MiB of it have landed."""
    for t in replication(n)["transfers"]:
        if (t["direction"] == "in" and t["digest"] == f"sha256:{hexd}" and t["bytes"] >= 8 * MiB
                and ("+" in t["peer"]) == ranges):
            return t  # type: ignore[no-any-return]
    return None


def check_failed_cleanly(b: NodeProc, mnt: Path, filler: Path, hexd: str, used_before: int,
                         failed_before: int, *, ranges: bool) -> None:
    """After the disk filled during the copy of BIG to `b`: the error says so,
    nothing of BIG is visible or left behind, and `b` still serves SMALL."""
    until("b's copy to fail for lack of space", 30,
          lambda: replication(b)["totals"]["failed_in"] > failed_before
          and "no space left on the data dir" in (replication(b)["last_error"] or ""))
    st = replication(b)
    print(f"    last_error: {st['last_error']}")
    assert st["last_error"].startswith(f"{BIG} from "), st["last_error"]
    assert "free some space there" in st["last_error"] and str(store(b)) in st["last_error"], st["last_error"]
    core = st["totals"]["last_error"] or ""
    assert f"sha256:{hexd}" in core and "no space left on the data dir" in core, core
    if ranges:
        assert "from several peers" in core, core
    assert "no space left on the data dir" in b.log() and "Traceback" not in b.log()

    step("nothing of it visible, no partial left, its space back")
    assert not (store(b) / manifest_of(BIG)).exists()
    big = tags(b)[BIG]  # listed, as the peer's: b serves it through a
    assert big["details"]["remote_node"] and big["size"] == 0, big
    assert not (store(b) / "blobs" / f"sha256-{hexd}").exists()
    # a retry may hold a partial for an instant; between retries there is none
    until("no partial on b and the space back", 20,
          lambda: not p2p_files(b) and used_without(mnt, filler) < used_before + 4 * MiB)

    step("b keeps serving what it has, and stays in the cluster")
    with urllib.request.urlopen(b.url + "/health", timeout=10) as r:
        assert r.status == 200
    raft: Any = b.get("/api/distributed/status")
    assert raft["role"] in ("follower", "learner") and not raft["degraded"], raft  # promoted when caught up
    assert local(b, SMALL) and {n for n, m in tags(b).items() if "remote_node" not in m["details"]} == {SMALL}
    out = post(b.url + "/api/generate", {"model": SMALL, "prompt": "Hi", "stream": False,
                                         "options": {"num_predict": 3}})
    assert out["done"] and out["response"].strip(), out


@pytest.fixture
def nodes(small_disk: Path, tmp_path: Path) -> Iterator[dict[str, NodeProc]]:
    started: dict[str, NodeProc] = {}
    yield started
    for n in started.values():
        n.stop()


def test_a_disk_that_fills_during_a_copy_from_one_holder(
        nodes: dict[str, NodeProc], small_disk: Path, tmp_path: Path) -> None:
    a = nodes["a"] = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=ENV)
    b = nodes["b"] = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)),
                                data_dir=small_disk / "b", env=SLOW)
    until("a and b see each other", 20,
          lambda: all(n.get("/health")["services"]["p2p_peers"] == 1 for n in (a, b)))  # type: ignore[index]

    step("a small model reaches b's small disk")
    create(a, SMALL, MiB)
    until("the small model on b", 30, lambda: local(b, SMALL))
    used_before = shutil.disk_usage(small_disk).used

    step("a 40 MiB model: while b copies it, the disk fills up")
    hexd = create(a, BIG, BIG_SIZE)
    want = files_of(a, BIG)
    seen = until("b's copy under way", 30, lambda: transfer_in(b, hexd, ranges=False) is not None)
    fill_then_free(b, small_disk, hexd, want, used_before, seen, ranges=False)


def test_a_disk_that_fills_during_a_copy_in_ranges_from_two_holders(
        nodes: dict[str, NodeProc], small_disk: Path, tmp_path: Path) -> None:
    a = nodes["a"] = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=ENV)
    token = token_of(a)
    c = nodes["c"] = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "c",
                                env=ENV)
    b = nodes["b"] = start_node(tmp_path, "--engine", "mock", *join_args(a, token),
                                data_dir=small_disk / "b", env=SLOW)
    until("three nodes connected", 20,
          lambda: all(n.get("/health")["services"]["p2p_peers"] == 2 for n in (a, b, c)))  # type: ignore[index]
    create(a, SMALL, MiB)
    until("the small model on b and c", 30, lambda: local(b, SMALL) and local(c, SMALL))
    used_before = shutil.disk_usage(small_disk).used

    step("b's disk too full for a 40 MiB model while it goes to c, so that b then copies from both")
    # room left for the node's own small writes (its Raft state): see test_a_full_disk_keeps_raft_up
    early = fill(small_disk, "early", leave=2 * MiB)
    hexd = create(a, BIG, BIG_SIZE)
    want = files_of(a, BIG)
    until("the big model on c", 30, lambda: local(c, BIG))
    assert not local(b, BIG)
    early.unlink()

    step("b copies it in ranges from a and c; the disk fills up meanwhile")
    seen = until("b's copy from both under way", 90, lambda: transfer_in(b, hexd, ranges=True) is not None)
    fill_then_free(b, small_disk, hexd, want, used_before, seen, ranges=True)


def fill_then_free(b: NodeProc, small_disk: Path, hexd: str, want: dict[str, bytes], used_before: int,
                   seen: float, ranges: bool) -> None:
    """With b's copy of BIG under way: fill the disk, check it failed cleanly,
    free the space, and check the copy then completes byte-identical."""
    failed_before = replication(b)["totals"]["failed_in"]
    filler = fill(small_disk)
    print(f"    filled after {seen:.1f}s: {filler.stat().st_size / 1e6:.0f} MB")
    check_failed_cleanly(b, small_disk, filler, hexd, used_before, failed_before, ranges=ranges)

    step("space freed: the copy completes")
    filler.unlink()
    until("the big model on b", 120, lambda: local(b, BIG))
    assert files_of(b, BIG) == want
    assert not p2p_files(b)


def delete(n: NodeProc, model: str) -> None:
    req = urllib.request.Request(n.url + "/api/delete", data=json.dumps({"model": model}).encode(),
                                 method="DELETE", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def test_a_full_disk_for_a_while_keeps_raft_up(
        nodes: dict[str, NodeProc], small_disk: Path, tmp_path: Path) -> None:
    a = nodes["a"] = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=ENV)
    token = token_of(a)
    c = nodes["c"] = start_node(tmp_path, "--engine", "mock", *join_args(a, token), data_dir=tmp_path / "c",
                                env=ENV)
    b = nodes["b"] = start_node(tmp_path, "--engine", "mock", *join_args(a, token),
                                data_dir=small_disk / "b", env=ENV)
    until("three nodes connected", 20,
          lambda: all(n.get("/health")["services"]["p2p_peers"] == 2 for n in (a, b, c)))  # type: ignore[index]
    # a joiner starts as a learner: until c votes, a and c are no quorum without b
    until("three voters", 20, lambda: all(n.get("/api/distributed/status")["role"] in ("leader", "follower")  # type: ignore[index]
                                          for n in (a, b, c)))

    step("b's disk full while the cluster commits a delete (a and c are a quorum)")
    filler = fill(small_disk)
    create(a, "gone-1:latest", MiB)
    delete(a, "gone-1:latest")
    until("the delete committed", 20, lambda: "gone-1:latest" in replication(a)["cluster_tombstones"])
    until("b says it is degraded: it cannot store what it is sent", 20,
          lambda: b.get("/api/distributed/status")["degraded"] is True)  # type: ignore[index]
    until("b to log why", 10, lambda: "cannot save the raft state" in b.log_path.read_text())
    time.sleep(2)

    step("space back: b follows the next commit")
    filler.unlink()
    create(a, "gone-2:latest", MiB)
    delete(a, "gone-2:latest")
    until("the next delete committed", 20, lambda: "gone-2:latest" in replication(c)["cluster_tombstones"])
    st = b.get("/api/distributed/status")
    print(f"    b: role {st['role']}, degraded {st['degraded']}")  # type: ignore[index]
    until("b's Raft to follow", 20, lambda: "gone-2:latest" in replication(b)["cluster_tombstones"])
    assert b.get("/api/distributed/status")["role"] in ("follower", "learner")  # type: ignore[index]
    until("b no longer degraded", 20, lambda: b.get("/api/distributed/status")["degraded"] is False)  # type: ignore[index]
    assert not list((small_disk / "b" / "raft").glob("*.tmp"))  # no half-written state left
