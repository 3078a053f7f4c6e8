"""A registry round trip through the cluster (Debian's docker-registry on
127.0.0.1): A pushes smollm2 there; B, in the same cluster and with no model at
all, pulls it, and the layers come from A (which holds the same manifest under
its own name) over QUIC instead of the registry: one download serves every
box. The result is byte-identical, stays on B, and generates."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import ollama
import pytest

from ..conftest import MODEL, start_node
from ..integration.test_registry import RegistryProc, registry, statuses, store_files  # noqa: F401
from .test_nodes import join_args, step, token_of, until

pytestmark = pytest.mark.cluster


def test_a_pull_takes_the_layers_a_peer_holds(registry: RegistryProc, tmp_path: Path) -> None:  # noqa: F811
    a = start_node(tmp_path, data_dir=tmp_path / "a", env={"OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "1"})
    cfg = tmp_path / "b.yaml"
    cfg.write_text('models:\n  default: ""\n  replicas: 1\n')
    b = start_node(tmp_path, "--config", str(cfg), *join_args(a, token_of(a)), data_dir=tmp_path / "b")
    try:
        until("a and b connected", 20,
              lambda: all(n.get("/health")["services"]["p2p_peers"] == 1 for n in (a, b)))  # type: ignore[index]
        name = f"{registry.host}/library/smollm2:135m"
        step("a pushes smollm2 to the registry, then drops that name (it keeps its own smollm2:135m)")
        client_a = ollama.Client(host=a.url)
        client_a.copy(MODEL, name)
        assert list(client_a.push(name, insecure=True, stream=True))[-1].status == "success"
        client_a.delete(name)

        step("b pulls it: the manifest from the registry, the 98 MB of layers from a over QUIC")
        before = b.get("/api/distributed/replication/status")["totals"]["bytes_in"]  # type: ignore[index]
        events = [e.model_dump(exclude_none=True)
                  for e in ollama.Client(host=b.url).pull(name, insecure=True, stream=True)]
        s = statuses(events)
        assert s[0] == "pulling manifest" and s[-1] == "success", s
        moved = b.get("/api/distributed/replication/status")["totals"]["bytes_in"] - before  # type: ignore[index]
        assert moved >= 98_000_000, moved
        assert "instead of the registry" in b.log_path.read_text()
        mine, theirs = store_files(b), store_files(a)
        assert mine and all(theirs[k] == v for k, v in mine.items())

        until("b's copy placed on b", 10, lambda: any(
            m["model"] == name and m["assigned"] == [m["holders"][0]] and len(m["holders"]) == 1
            for m in b.get("/api/distributed/replication/status")["models"]))  # type: ignore[index]
        assert name in [m["name"] for m in b.get("/api/tags")["models"]]  # type: ignore[index]

        step("it generates on b")
        req = urllib.request.Request(b.url + "/api/generate", data=json.dumps(
            {"model": name, "prompt": "Hi", "stream": False, "options": {"num_predict": 3}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["done"] and out["response"]
    finally:
        for n in (a, b):
            n.stop()
