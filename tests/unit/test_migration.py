"""Mid-stream migration in isolation (issue 13): a real Dispatcher with
scripted peers that stream numbered words with their token ids and fail where
told; the entry node resumes the stream on the next holder with the ids it
has, and the client sees one continuous stream with merged stats."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed import errors
from ollama_distributed.config import Config
from ollama_distributed.dispatch import Dispatcher, continued
from ollama_distributed.engines.base import CancelToken, InferenceRequest
from ollama_distributed.engines.mock import MockEngine

from .scripted_peers import ScriptedPeers, hang, routed_dispatcher

N = 12  # words in a whole answer


class Peers(ScriptedPeers):
    """Peer `node` streams word i with token id i from where the request's
    continuation left off; `fail[node]` = (after how many of its own words,
    the error) ends its stream there; "old" peers ignore the continuation
    and send no confirmation, as a node from before migration would."""

    def __init__(self, fail: dict[str, tuple[int, Exception | str]], old: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.fail = fail
        self.old = old

    async def forward(self, node_id: str, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        self.record(node_id, request)
        start = 0 if node_id in self.old else len(request["continuation"])
        limit = request["options"].get("num_predict", N - start)
        after, err = self.fail.get(node_id, (-1, ""))
        first = True
        for k, i in enumerate(range(start, start + limit)):
            if k == after:
                if err == "hang":
                    await hang()
                assert isinstance(err, Exception)
                raise err
            chunk: dict[str, Any] = {"text": f"w{i} ", "tokens": [i]}
            if first and request["continuation"] and node_id not in self.old:
                chunk["continued"] = start
            first = False
            yield chunk
        yield {"done": True, "done_reason": "length", "prompt_eval_count": 5, "eval_count": limit,
               "eval_duration": 1000, "context": [*range(start + limit)]}


def dispatcher(tmp_path: Path, peers: Peers, nodes: tuple[str, ...] = ("b", "c", "d"),
               **sched: Any) -> Dispatcher:
    return routed_dispatcher(tmp_path, peers, nodes, **sched)  # b first, then c, then d


async def run(d: Dispatcher, **req: Any) -> list[dict[str, Any]]:
    r = InferenceRequest(kind="generate", model="m:latest", prompt="hi", options={"num_predict": N}, **req)
    async with asyncio.timeout(30):
        return [c async for c in d._run_routed(r, None)]


def text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c.get("text", "") for c in chunks)


WHOLE = "".join(f"w{i} " for i in range(N))


def migrations(d: Dispatcher, kind: str) -> float:
    return d.metrics.migrations.labels(kind)._value.get()  # type: ignore[no-any-return]


async def test_a_stream_lost_mid_way_resumes_on_the_next_holder(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    peers = Peers({"b": (5, errors.PeerUnavailableError("connection lost"))})
    d = dispatcher(tmp_path, peers)
    with caplog.at_level(logging.WARNING):
        chunks = await run(d)
    assert text(chunks) == WHOLE  # nothing lost, nothing twice
    assert peers.asked == ["b", "c"]
    resumed = peers.requests[1][1]
    assert resumed["continuation"] == [0, 1, 2, 3, 4] and resumed["options"]["num_predict"] == N - 5
    assert resumed["prompt"] == "hi"  # the same request, not a re-render of text
    final = chunks[-1]
    assert final["done"] and final["eval_count"] == N and final["done_reason"] == "length"
    assert final["context"] == list(range(N)) and final["prompt_eval_count"] == 5
    assert sum(1 for c in chunks if c.get("done")) == 1
    assert not any("continued" in c for c in chunks)
    assert migrations(d, "ongoing") == 1 and migrations(d, "new") == 0
    assert any("from node b to node c after 5 tokens" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failure", [errors.EngineError("generation failed"),
                                     errors.StreamTimeoutError("node b stopped sending"),
                                     errors.from_status(500, "peer bug")])
async def test_any_node_failure_mid_stream_migrates(tmp_path: Path, failure: Exception) -> None:
    chunks = await run(dispatcher(tmp_path, Peers({"b": (3, failure)})))
    assert text(chunks) == WHOLE and chunks[-1]["eval_count"] == N


async def test_a_wedged_node_migrates_after_the_idle_timeout(tmp_path: Path) -> None:
    peers = Peers({"b": (4, "hang")})
    chunks = await run(dispatcher(tmp_path, peers, stream_idle_timeout_s=0.3))
    assert text(chunks) == WHOLE and peers.asked == ["b", "c"]


async def test_a_resumed_stream_may_move_again(tmp_path: Path) -> None:
    peers = Peers({"b": (3, errors.PeerUnavailableError("lost")), "c": (4, errors.EngineError("oom"))})
    d = dispatcher(tmp_path, peers)
    chunks = await run(d)
    assert text(chunks) == WHOLE and peers.asked == ["b", "c", "d"]
    assert peers.requests[2][1]["continuation"] == list(range(7))
    assert chunks[-1]["eval_count"] == N and migrations(d, "ongoing") == 2


async def test_the_migration_limit_bounds_the_moves(tmp_path: Path) -> None:
    peers = Peers({"b": (3, errors.PeerUnavailableError("b lost")), "c": (2, errors.PeerUnavailableError("c lost"))})
    got: list[dict[str, Any]] = []
    with pytest.raises(errors.PeerUnavailableError, match="c lost"):
        r = InferenceRequest(kind="generate", model="m:latest", prompt="hi", options={"num_predict": N})
        async for c in dispatcher(tmp_path, peers, migration_limit=1)._run_routed(r, None):
            got.append(c)
    assert text(got) == "w0 w1 w2 w3 w4 " and peers.asked == ["b", "c"]


async def test_the_default_limit_is_3(tmp_path: Path) -> None:
    fail = (1, errors.EngineError("flaky"))
    peers = Peers({"b": fail, "c": fail, "d": fail})
    with pytest.raises(errors.EngineError):
        await run(dispatcher(tmp_path, peers))
    assert peers.asked == ["b", "c", "d", "b"]  # the first try and 3 migrations


async def test_two_holders_a_transient_failure_on_each(tmp_path: Path) -> None:
    """b fails, c fails: back to b (not to the one that just failed)."""
    peers = Peers({"b": (3, errors.PeerUnavailableError("b lost")), "c": (2, errors.EngineError("c oom"))})
    d = dispatcher(tmp_path, peers, nodes=("b", "c"))
    peers.fail["b"] = (3, errors.PeerUnavailableError("b lost"))
    asked: list[str] = []
    orig = peers.forward

    def forward(node_id: str, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        asked.append(node_id)
        if asked.count("b") == 2:
            peers.fail.pop("b", None)  # its trouble has passed
        return orig(node_id, request)

    peers.forward = forward  # type: ignore[method-assign]
    chunks = await run(d)
    assert text(chunks) == WHOLE and asked == ["b", "c", "b"]


async def test_no_migration_when_the_limit_is_0(tmp_path: Path) -> None:
    peers = Peers({"b": (3, errors.PeerUnavailableError("b lost"))})
    with pytest.raises(errors.PeerUnavailableError):
        await run(dispatcher(tmp_path, peers, migration_limit=0))
    assert peers.asked == ["b"]


async def test_an_older_node_that_ignores_the_continuation_is_skipped(tmp_path: Path) -> None:
    """It would start over and repeat the text: the entry drops its stream unseen."""
    peers = Peers({"b": (3, errors.PeerUnavailableError("lost"))}, old=("c",))
    chunks = await run(dispatcher(tmp_path, peers))
    assert text(chunks) == WHOLE and peers.asked == ["b", "c", "d"]


async def test_no_other_holder_raises_the_original_error(tmp_path: Path) -> None:
    peers = Peers({"b": (3, errors.PeerUnavailableError("b lost"))})
    with pytest.raises(errors.PeerUnavailableError, match="b lost"):
        await run(dispatcher(tmp_path, peers, nodes=("b",)))


async def test_a_client_error_mid_stream_is_not_migrated(tmp_path: Path) -> None:
    peers = Peers({"b": (3, errors.BadRequestError("bad"))})
    with pytest.raises(errors.BadRequestError):
        await run(dispatcher(tmp_path, peers))
    assert len(peers.asked) == 1


async def test_a_grammar_constrained_stream_is_not_resumed(tmp_path: Path) -> None:
    """llama.cpp's grammar state cannot be replayed from token ids."""
    peers = Peers({"b": (3, errors.PeerUnavailableError("b lost"))})
    with pytest.raises(errors.PeerUnavailableError):
        await run(dispatcher(tmp_path, peers), format="json")
    assert len(peers.asked) == 1


async def test_a_failure_before_the_first_chunk_counts_as_a_new_migration(tmp_path: Path) -> None:
    peers = Peers({"b": (0, errors.PeerUnavailableError("b lost"))})
    d = dispatcher(tmp_path, peers)
    chunks = await run(d)
    assert text(chunks) == WHOLE and peers.requests[1][1]["continuation"] == []
    assert migrations(d, "new") == 1 and migrations(d, "ongoing") == 0


async def test_only_the_final_chunk_lost(tmp_path: Path) -> None:
    """Every token asked for arrived; the node died before its final chunk."""
    peers = Peers({"b": (N, errors.PeerUnavailableError("lost"))})
    chunks = await run(dispatcher(tmp_path, peers))
    assert text(chunks) == WHOLE and chunks[-1]["done"] and chunks[-1]["eval_count"] == N
    assert chunks[-1]["done_reason"] == "length" and len(peers.asked) == 1


def test_continued_reduces_num_predict_only_when_set() -> None:
    req = InferenceRequest(kind="chat", model="m", messages=[{"role": "user", "content": "x"}],
                           options={"temperature": 0})
    c = continued(req, [1, 2])
    assert c is not None and c.continuation == [1, 2] and "num_predict" not in c.options
    assert c.messages == req.messages and req.continuation == []  # the original is untouched
    assert continued(InferenceRequest(kind="generate", model="m", options={"num_predict": 2}), [1, 2]) is None


async def test_the_mock_engine_resumes_exactly(tmp_path: Path) -> None:
    """What the cluster tests rely on: a continuation of the mock's words
    after k of them gives exactly the rest."""
    from ollama_distributed.models.store import ModelRecord

    cfg = Config().engine
    cfg.mock_tokens = 10
    eng = MockEngine(cfg)
    from ollama_distributed.models import names

    rec = ModelRecord(name=names.parse("m"), digest="sha256:0", size=0, modified_at=0.0, manifest={},
                      config={}, model_path=None, model_digest=None)

    async def words(req: InferenceRequest) -> list[dict[str, Any]]:
        return [c async for c in eng.generate(req, rec, 0, CancelToken())]

    whole = await words(InferenceRequest(kind="generate", model="m", prompt="p"))
    ids = [t for c in whole for t in c.get("tokens", [])]
    rest = await words(InferenceRequest(kind="generate", model="m", prompt="p", continuation=ids[:4]))
    assert "".join(c.get("text", "") for c in whole[:4]) + "".join(c.get("text", "") for c in rest) == \
        "".join(c.get("text", "") for c in whole)
    assert rest[-1]["eval_count"] == 6


# ---- the drain's cut -------------------------------------------------------------


async def test_a_cut_ends_a_generation_waiting_for_its_next_chunk() -> None:
    from ollama_distributed.dispatch import Cut

    async def slow() -> AsyncGenerator[dict[str, Any], None]:
        yield {"text": "one "}
        await hang()
        yield {"text": "never "}

    cut = Cut()
    got: list[dict[str, Any]] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(10):
            async for c in cut.guard(slow()):
                got.append(c)
                asyncio.get_running_loop().call_later(0.05, cut.fire)
    assert got == [{"text": "one "}] and cut.fired


async def test_a_cut_fired_while_the_consumer_works_ends_before_the_next_chunk() -> None:
    from ollama_distributed.dispatch import Cut

    async def fast() -> AsyncGenerator[dict[str, Any], None]:
        for i in range(5):
            yield {"text": f"{i} "}

    cut = Cut()
    got: list[dict[str, Any]] = []
    with pytest.raises(TimeoutError):
        async for c in cut.guard(fast()):
            got.append(c)
            if len(got) == 2:
                cut.fire()  # not waiting for the engine now: the consumer is not interrupted
                await asyncio.sleep(0.01)
    assert len(got) == 2


async def test_an_unfired_cut_passes_everything() -> None:
    from ollama_distributed.dispatch import Cut

    async def fast() -> AsyncGenerator[dict[str, Any], None]:
        for i in range(3):
            yield {"text": f"{i} "}

    assert len([c async for c in Cut().guard(fast())]) == 3


async def test_a_draining_node_sheds_its_queue_when_a_peer_can_take_it(tmp_path: Path) -> None:
    d = dispatcher(tmp_path, Peers({}), nodes=("b",))
    d.cfg.engine.num_parallel = 1
    d.reconfigure(d.cfg)
    first, _ = await d._acquire("m:latest")
    waiter = asyncio.create_task(d._acquire("m:latest"))
    await asyncio.sleep(0.01)
    assert not waiter.done() and d.scheduler.queue_depth() == 1
    d.draining = True
    assert d.shed_queue() == 1
    with pytest.raises(errors.DrainingError) as e:
        await waiter
    assert e.value.status == 503 and d.scheduler.queue_depth() == 0
    d._release("m:latest", first)


async def test_with_no_peer_to_take_it_the_queue_stays(tmp_path: Path) -> None:
    d = dispatcher(tmp_path, Peers({}), nodes=())
    d.cfg.engine.num_parallel = 1
    d.reconfigure(d.cfg)
    first, _ = await d._acquire("m:latest")
    waiter = asyncio.create_task(d._acquire("m:latest"))
    await asyncio.sleep(0.01)
    d.draining = True
    assert d.shed_queue() == 0
    d._release("m:latest", first)
    slot, position = await asyncio.wait_for(waiter, 5)  # served here once the slot frees
    assert slot >= 0 and position == 1
