"""Routing a model loaded nowhere, through the node's advert and the Rust
`Scheduler`: a node that can load it without evicting a busy model comes
first, even with more requests in flight."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed import _core
from ollama_distributed.config import Config
from ollama_distributed.engines.base import LoadedModel
from ollama_distributed.models import names
from ollama_distributed.models.store import MODEL_MEDIA, layer
from ollama_distributed.node import Node

MODEL = "m:latest"  # as the store names it


class FakeCluster:
    """What `Node._refresh_local_node` and `_sync_peers` use of ClusterService."""

    def __init__(self) -> None:
        self.peers: list[dict[str, Any]] = []
        self.published: list[dict[str, Any]] = []

    def publish_advert(self, advert: dict[str, Any]) -> None:
        self.published.append(advert)

    def nodes(self) -> list[dict[str, Any]]:
        return self.peers


def loaded(*models: str) -> list[LoadedModel]:
    return [LoadedModel(name=m, digest="", size=0, expires_at=None, details={}) for m in models]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    """Node "a" with the mock engine, holding MODEL (not loaded) and with "x" loaded."""
    cfg = Config()
    cfg.engine.kind = "mock"
    cfg.engine.max_loaded_models = 1
    cfg.node.id = "a"
    cfg.node.data_dir = str(tmp_path)
    n = Node(cfg)
    n.store.ensure()
    digest, size = n.store.put_bytes(b"weights")
    n.store.write_manifest(names.parse(MODEL), [layer(MODEL_MEDIA, digest, size)], {"model_format": "gguf"})
    monkeypatch.setattr(n.engine, "loaded", lambda: loaded("x"))
    n.cluster = FakeCluster()
    return n


def peer_b(**advert: Any) -> dict[str, Any]:
    """Peer "b" holds MODEL, has "y" (busy) and "z" loaded, 2 requests in flight."""
    return {"id": "b", "alive": True, "advert_at": time.time(),
            "advert": {"models": [MODEL], "loaded": ["y", "z"], "in_flight": 2, "queue_depth": 0,
                       "max_queue": 8, **advert}}


def test_the_advert_names_the_busy_loaded_models(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.engine, "loaded", lambda: loaded("x", "y", "z"))
    sched = node.dispatcher.scheduler
    assert sched.admit("x", 1, 0) >= 0
    assert sched.admit("y#embed", 2, 0) >= 0  # an embedding keeps its model busy too
    a = node.advert()
    assert a["max_loaded_models"] == 1
    assert a["busy"] == ["x", "y"]
    sched.release("x", 0, 1)
    assert node.advert()["busy"] == ["y"]


def test_a_peer_with_an_idle_model_beats_a_local_node_full_of_busy_ones(node: Node) -> None:
    sched = node.dispatcher.scheduler
    assert sched.admit("x", 1, 0) >= 0  # a: 1 in flight, its one model slot busy
    node.cluster.peers = [peer_b(max_loaded_models=2, busy=["y"])]
    node._refresh_local_node()
    assert node.cluster.published[-1]["busy"] == ["x"]
    assert sched.route(MODEL, int(time.time() * 1000)) == ["b", "a"]

    # x idle on a: a can unload it, and has fewer in flight than b
    sched.release("x", 0, 1)
    node._refresh_local_node()
    assert sched.route(MODEL, int(time.time() * 1000)) == ["a", "b"]


def test_a_peer_full_of_busy_models_is_not_preferred(node: Node) -> None:
    sched = node.dispatcher.scheduler
    assert sched.admit("x", 1, 0) >= 0
    node.cluster.peers = [peer_b(max_loaded_models=2, busy=["y", "z"])]
    node._refresh_local_node()
    # both would evict a busy model: fewest in flight (a: 1, b: 2) decides
    assert sched.route(MODEL, int(time.time() * 1000)) == ["a", "b"]


def test_a_peer_advert_without_the_new_keys_is_not_passed_over(node: Node) -> None:
    sched = node.dispatcher.scheduler
    assert sched.admit("x", 1, 0) >= 0
    node.cluster.peers = [peer_b()]  # an older peer: no max_loaded_models, no busy
    node._refresh_local_node()
    # b might have to evict, a must: b is not guessed to be full
    assert sched.route(MODEL, int(time.time() * 1000)) == ["b", "a"]


def test_update_node_without_the_new_arguments_is_not_penalised() -> None:
    s = _core.Scheduler("a", 1, 8)
    s.update_node("a", True, 1_000, ["m"], ["x"], 2, 0, 8)  # the old call: no bound said
    s.update_node("b", True, 1_000, ["m"], ["y"], 1, 0, 8, max_loaded_models=1, busy=["y"])
    assert s.route("m", 1_000) == ["a", "b"]  # b must evict its busy y, a is not known to
    s.update_node("b", True, 1_000, ["m"], ["y"], 1, 0, 8, max_loaded_models=1, busy=[])
    assert s.route("m", 1_000) == ["b", "a"]  # y idle: fewest in flight decides
