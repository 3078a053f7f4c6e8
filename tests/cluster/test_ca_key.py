"""Only voters hold the cluster CA key, through real node processes (mock
engine) with p2p.max_voters 2: the README's join flow (`cluster token` to a
file, `start --join HOST --token-file FILE`); a third node, a learner, holds
no CA key; a fourth joins through that learner's address (the learner has a
voter sign it) with the token read from the learner's data dir; a learner that
kept the key from an older release deletes it on start and says so; the join
token rotates from a learner too."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import CLI, NodeProc, start_node
from .test_nodes import converged, status, step, token_of, until

pytestmark = pytest.mark.cluster

ENV = {"OLLAMA_DISTRIBUTED_P2P_MAX_VOTERS": "2"}


def ca_key(n: NodeProc) -> Path:
    return n.data_dir / "tls" / "ca.key"


def join(tmp: Path, name: str, via: NodeProc, token: str) -> NodeProc:
    (tmp / f"token-{name}").write_text(token + "\n")
    return start_node(tmp, "--engine", "mock", "--join", f"127.0.0.1:{via.p2p_port}",
                      "--token-file", str(tmp / f"token-{name}"), data_dir=tmp / name, env=ENV)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProc]]:
    tmp = tmp_path_factory.mktemp("cakey")
    nodes: dict[str, NodeProc] = {}
    try:
        step("start a; b joins a with the README's flow (cluster token > file, --token-file)")
        nodes["a"] = start_node(tmp, "--engine", "mock", data_dir=tmp / "a", env=ENV)
        token = token_of(nodes["a"])
        nodes["b"] = join(tmp, "b", nodes["a"], token)
        until("a and b voters", 30, lambda: converged(list(nodes.values()), 2)
              and {status(n)["role"] for n in nodes.values()} == {"leader", "follower"})
        step("c joins a: with two voters already, it stays a learner")
        nodes["c"] = join(tmp, "c", nodes["a"], token)
        until("three nodes, c a learner", 30, lambda: converged(list(nodes.values()), 3)
              and status(nodes["c"])["role"] == "learner")
        step("d joins through the learner c, with the token from c's data dir")
        nodes["d"] = join(tmp, "d", nodes["c"], token_of(nodes["c"]))
        until("four nodes", 30, lambda: converged(list(nodes.values()), 4))
        yield nodes
    finally:
        for n in nodes.values():
            n.stop()


def test_only_voters_hold_the_ca_key(four: dict[str, NodeProc]) -> None:
    a, b, c, d = four["a"], four["b"], four["c"], four["d"]
    until("b, promoted, fetched the key", 10, lambda: ca_key(b).is_file())
    assert ca_key(a).is_file()
    assert (status(c)["role"], status(d)["role"]) == ("learner", "learner")
    for n in (c, d):
        assert not ca_key(n).exists(), n.data_dir
        assert (n.data_dir / "tls" / "ca.pem").is_file() and (n.data_dir / "tls" / "node.pem").is_file()
    d_id = status(d)["node_id"]
    assert re.search(rf"node '{re.escape(d_id)}' joined through this node, signed by voter", c.log()), c.log()
    assert f"node '{d_id}' joined through '{status(c)['node_id']}', signed here" in (a.log() + b.log())
    assert "gave the cluster CA key to voter" in a.log()


def test_a_learner_deletes_a_key_left_by_an_older_release(four: dict[str, NodeProc], tmp_path: Path) -> None:
    d = four["d"]
    step("stop d, put the CA key in its data dir as an older release did, start it again")
    d.stop()
    shutil.copy(ca_key(four["a"]), ca_key(d))
    again = start_node(tmp_path, "--engine", "mock", data_dir=d.data_dir, env=ENV)
    four["d"] = again
    until("d deleted it", 15, lambda: not ca_key(again).exists())
    assert "this node is not a voter: deleted the cluster CA key" in again.log()
    until("four nodes again", 30, lambda: converged(list(four.values()), 4))


def test_the_token_rotates_from_a_learner(four: dict[str, NodeProc]) -> None:
    a, c = four["a"], four["c"]
    before = token_of(a)
    out = subprocess.run([*CLI, "cluster", "token", "--rotate", "--data-dir", str(c.data_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rotated = out.stdout.strip()
    assert rotated.startswith("OD1:") and rotated != before
    until("a answers with the new token", 5, lambda: token_of(a) == rotated)
