"""When a model splits across nodes and into which shares (engines/split.py, issue 16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ollama_distributed import config
from ollama_distributed.engines.split import Candidate, InsufficientMemoryError, candidates, choose, shares
from ollama_distributed.errors import ConfigError

ME = Candidate("me", 400, True)


def test_a_model_that_fits_this_node_is_never_split() -> None:
    assert choose("m", 400, ME, [Candidate("big", 10_000, True)]) is None
    assert choose("m", 1, ME, []) is None


def test_the_fewest_peers_that_fit_it() -> None:
    peers = [Candidate("a", 100), Candidate("b", 300), Candidate("c", 200)]
    got = choose("m", 650, ME, peers)
    assert got is not None and [c.node for c in got] == ["me", "b"]  # 400 + 300 >= 650: one peer
    got = choose("m", 850, ME, peers)
    assert got is not None and [c.node for c in got] == ["me", "b", "c"]


def test_blob_holders_preferred_within_the_fewest() -> None:
    peers = [Candidate("big", 500), Candidate("holder", 300, holds=True), Candidate("small-holder", 50, holds=True)]
    got = choose("m", 650, ME, peers)
    # one peer is enough either way: the holder that fits wins over the larger non-holder
    assert got is not None and [c.node for c in got] == ["me", "holder"]
    # a holder too small to make one peer enough is not taken over a set of one
    got = choose("m", 850, ME, peers)
    assert got is not None and [c.node for c in got] == ["me", "big"]


def test_not_enough_memory_names_needed_and_available() -> None:
    with pytest.raises(InsufficientMemoryError) as e:
        choose("big:7b", 5000, ME, [Candidate("a", 1000), Candidate("b", 0)])
    assert e.value.status == 507
    assert (e.value.need_mib, e.value.available_mib) == (5000, 1400)
    assert "needs 5000 MiB" in e.value.message and "1400 MiB available" in e.value.message
    assert "a: 1000 MiB" in e.value.message
    with pytest.raises(InsufficientMemoryError) as e:
        choose("big:7b", 5000, ME, [])
    assert "no peer offers memory over RPC" in e.value.message


@pytest.mark.parametrize("mems, n_layers", [([60, 60], 30), ([400, 300, 200], 30), ([1, 1000], 30),
                                             ([100, 100, 100], 2)])
def test_shares_follow_the_budgets_and_stay_within_them(mems: list[int], n_layers: int) -> None:
    chosen = [Candidate(f"n{i}", m) for i, m in enumerate(mems)]
    need = sum(mems) - 1
    parts = shares(need, chosen, n_layers)
    assert [p.node for p in parts] == [c.node for c in chosen]
    assert parts[0].local and not any(p.local for p in parts[1:])
    assert sum(p.layers for p in parts) == n_layers + 1  # llama.cpp counts the output layer
    assert all(p.layers >= 1 for p in parts)
    assert all(p.share_mib <= p.memory_mib for p in parts)
    assert sum(p.share_mib for p in parts) >= need
    if len(set(mems)) == 1:
        assert max(p.layers for p in parts) - min(p.layers for p in parts) <= 1


def test_candidates_are_alive_peers_serving_rpc() -> None:
    adverts: dict[str, dict[str, Any] | None] = {
        "b": {"rpc_ready": True, "rpc_memory_mib": 500, "models": ["m:1"]},
        "c": {"rpc_ready": False, "rpc_memory_mib": 0},
        "d": {"rpc_ready": True, "rpc_memory_mib": 300},
        "e": None,  # a rejected advert
    }
    nodes = [{"id": "me", "local": True, "alive": True}, {"id": "b", "alive": True}, {"id": "c", "alive": True},
             {"id": "d", "alive": False}, {"id": "e", "alive": True}]
    got = candidates(nodes, lambda n: adverts.get(n["id"]), "me", "m:1")
    assert got == [Candidate("b", 500, True)]


def test_max_model_memory_mib_is_a_checked_key(tmp_path: Path) -> None:
    assert config.Config().engine.max_model_memory_mib == 0
    f = tmp_path / "c.yaml"
    f.write_text("engine: {max_model_memory_mib: 60}\n")
    assert config.load(f, environ={}).engine.max_model_memory_mib == 60
    cfg = config.load(f, environ={"OLLAMA_DISTRIBUTED_ENGINE_MAX_MODEL_MEMORY_MIB": "70"})
    assert cfg.engine.max_model_memory_mib == 70
    f.write_text("engine: {max_model_memory_mib: -1}\n")
    with pytest.raises(ConfigError) as e:
        config.load(f, environ={})
    assert "engine.max_model_memory_mib" in str(e.value)


# ---- the engine wrapper: a model that fits never reaches the split path ------------


class _Inner:
    """Stands in for LlamaCppEngine: records what reached it."""

    kind = "llamacpp"
    continues = True
    uses_store = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def generate(self, req: Any, record: Any, slot: int, cancel: Any) -> Any:
        self.calls.append(f"generate {record.name.short}")
        yield {"text": "x"}

    async def load(self, req: Any, record: Any) -> float:
        self.calls.append(f"load {record.name.short}")
        return 0.0

    def loaded(self) -> list[Any]:
        return []


def _engine(tmp_path: Path, budget_mib: int, opened: list[str]) -> tuple[Any, Any, Any]:
    from ollama_distributed.config import EngineSection
    from ollama_distributed.engines.split import SplittingEngine
    from ollama_distributed.models.catalog import register_default
    from ollama_distributed.models.store import Store

    store = Store(tmp_path / "models")
    store.ensure()
    register_default(store, "smollm2:135m")
    inner = _Inner()
    eng = SplittingEngine(inner, EngineSection(max_model_memory_mib=budget_mib), store.root, "me",
                          peers=lambda m: [], open_tunnel=lambda p: opened.append(p) or 1,
                          close_tunnel=lambda port: True)
    return eng, inner, store.get("smollm2:135m")


def test_a_model_that_fits_goes_to_the_inner_engine(tmp_path: Path) -> None:
    import asyncio

    from ollama_distributed.engines.base import CancelToken, InferenceRequest

    opened: list[str] = []
    eng, inner, rec = _engine(tmp_path, 0, opened)  # 0: the machine's memory

    async def run() -> list[Any]:
        req = InferenceRequest(kind="generate", model="smollm2:135m", prompt="hi")
        return [c async for c in eng.generate(req, rec, 0, CancelToken())]

    assert asyncio.run(run()) == [{"text": "x"}]
    assert inner.calls == ["generate smollm2:135m"] and opened == []
    assert eng.kind == "llamacpp" and eng.continues  # the rest is the inner engine's


def test_a_model_larger_than_the_cluster_is_refused_before_any_load(tmp_path: Path) -> None:
    import asyncio

    from ollama_distributed.engines.base import CancelToken, InferenceRequest
    from ollama_distributed.errors import NotAvailableError

    opened: list[str] = []
    eng, inner, rec = _engine(tmp_path, 60, opened)  # the model takes ~94 MiB, no peer offers any

    async def run() -> list[Any]:
        req = InferenceRequest(kind="generate", model="smollm2:135m", prompt="hi")
        return [c async for c in eng.generate(req, rec, 0, CancelToken())]

    with pytest.raises(InsufficientMemoryError) as e:
        asyncio.run(run())
    assert e.value.status == 507 and e.value.available_mib == 60 and e.value.need_mib > 60
    assert inner.calls == [] and opened == [] and eng.loaded() == []
    with pytest.raises(NotAvailableError):
        asyncio.run(eng.embed(InferenceRequest(kind="embed", model="smollm2:135m", input=["a"]), rec))
