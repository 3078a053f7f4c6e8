"""Issue 10's rules in isolation: supervised loops, peer adverts checked field
by field, which failures move a request to the next holder, and the stream
timeouts, on a real Dispatcher with the mock engine and a scripted peer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed import errors
from ollama_distributed.cluster import advert
from ollama_distributed.dispatch import Dispatcher, embed_parts, retryable
from ollama_distributed.engines.base import InferenceRequest

from .scripted_peers import ScriptedPeers, hang, routed_dispatcher

# ---- supervisor ---------------------------------------------------------------


async def test_a_failing_pass_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    from ollama_distributed.supervise import Supervisor

    sup = Supervisor()
    passes: list[int] = []

    async def once() -> None:
        passes.append(1)
        if len(passes) == 2:
            raise ValueError("one bad pass")

    with caplog.at_level(logging.ERROR):
        sup.loop("advert", once, lambda: 0.01)
        while len(passes) < 5:
            await asyncio.sleep(0.01)
    assert sup.healthy and sup.failed_passes["advert"] == 1
    assert any("one bad pass" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    await sup.stop()
    assert sup.healthy  # stopping is not dying


async def test_a_task_that_ends_for_good_is_recorded_by_name() -> None:
    from ollama_distributed.supervise import Supervisor

    sup = Supervisor()

    async def dies() -> None:
        raise RuntimeError("gone")

    async def returns() -> None:
        return None

    sup.watch("replication", dies())
    sup.watch("reaper", returns())
    await asyncio.sleep(0.05)
    assert not sup.healthy
    assert "gone" in sup.dead["replication"] and sup.dead["reaper"] == "it returned"


async def test_the_watchdog_is_withheld_while_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    from ollama_distributed import systemd

    sent: list[str] = []
    n = systemd.Notifier()
    monkeypatch.setattr(n, "send", lambda *lines: sent.extend(lines))
    healthy = [True]
    task = asyncio.create_task(n._ping(0.02, lambda: healthy[0]))
    await asyncio.sleep(0.1)
    assert "WATCHDOG=1" in sent
    healthy[0] = False
    await asyncio.sleep(0.05)
    sent.clear()
    await asyncio.sleep(0.1)
    task.cancel()
    assert "WATCHDOG=1" not in sent


# ---- adverts --------------------------------------------------------------------

GOOD = {"id": "b", "name": "b", "models": ["smollm2:135m"], "loaded": [], "busy": [], "in_flight": 1,
        "queue_depth": 0, "max_queue": 512, "max_loaded_models": 3, "labels": {"zone": "x"},
        "resources": {"cpu": 0.5, "memory_total_bytes": 1 << 34}}


def test_a_good_advert_passes_unchanged() -> None:
    assert advert.check(GOOD) == GOOD
    assert advert.check(None) == {}


@pytest.mark.parametrize("field,value", [
    ("in_flight", -1), ("in_flight", None), ("in_flight", "3"), ("in_flight", True), ("in_flight", 10**12),
    ("queue_depth", 1.5), ("max_queue", [1]), ("max_loaded_models", -3),
    ("models", None), ("models", "smollm2"), ("models", [None]), ("models", ["../../etc/passwd"]),
    ("models", ["m"] * 20_000), ("loaded", {"a": 1}), ("busy", [7]),
    ("resources", "hot"), ("resources", {"cpu": "hot"}), ("resources", {"cpu": -1}),
    ("labels", {"a": 1}), ("name", 5), ("api_address", "x" * 5000),
])
def test_a_wrong_field_is_named(field: str, value: Any) -> None:
    with pytest.raises(advert.BadAdvert) as e:
        advert.check({**GOOD, field: value})
    assert e.value.field.split(".")[0] == field


def test_not_an_object() -> None:
    with pytest.raises(advert.BadAdvert):
        advert.check([1, 2])


# ---- retries and timeouts ----------------------------------------------------------


def test_which_failures_go_to_the_next_holder() -> None:
    assert retryable(errors.PeerUnavailableError("lost"))
    assert retryable(errors.OverloadedError("full"))
    assert retryable(errors.ModelNotFoundError("m"))  # its copy was just trimmed
    assert retryable(errors.EngineError("boom"))
    assert retryable(errors.StreamTimeoutError("wedged"))
    assert retryable(errors.CoreError("no quorum"))
    assert retryable(errors.from_status(500, "peer bug"))
    assert not retryable(errors.BadRequestError("bad option"))
    assert not retryable(errors.from_status(413, "too large"))
    assert not retryable(errors.from_status(400, "bad"))


def test_embeddings_split_and_join() -> None:
    vecs = [[float(i)] * 1000 for i in range(1000)]
    parts = list(embed_parts({"embeddings": vecs, "prompt_eval_count": 7}))
    assert len(parts) > 1
    assert [v for p in parts for v in p["embeddings"]] == vecs
    assert parts[-1]["prompt_eval_count"] == 7 and "prompt_eval_count" not in parts[0]
    assert list(embed_parts({"embeddings": []})) == [{"embeddings": []}]


class Peers(ScriptedPeers):
    """Each peer either raises an error before its first chunk, hangs, or streams."""

    def __init__(self, script: dict[str, Any]) -> None:
        super().__init__()
        self.script = script

    async def forward(self, node_id: str, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        self.record(node_id, request)
        what = self.script[node_id]
        if isinstance(what, Exception):
            raise what
        if what == "hang":
            await hang()
        if what == "hang-after-one":
            yield {"text": "one "}
            await hang()
        yield {"text": f"from {node_id}"}
        yield {"done": True, "done_reason": "stop", "eval_count": 1}


def dispatcher(tmp_path: Path, peers: Peers, **sched: Any) -> Dispatcher:
    return routed_dispatcher(tmp_path, peers, peers.script, **sched)  # b first: the fewest in flight


async def collect(d: Dispatcher) -> list[dict[str, Any]]:
    req = InferenceRequest(kind="generate", model="m:latest", prompt="hi")
    return [c async for c in d._run_routed(req, None)]


@pytest.mark.parametrize("failure", [
    errors.ModelNotFoundError("model 'm' not found"), errors.PeerUnavailableError("connection lost"),
    errors.OverloadedError("busy"), errors.EngineError("generation failed"),
])
async def test_a_failure_before_the_first_chunk_goes_to_the_next_holder(tmp_path: Path,
                                                                         failure: Exception) -> None:
    peers = Peers({"b": failure, "c": "ok"})
    chunks = await collect(dispatcher(tmp_path, peers))
    assert peers.asked == ["b", "c"] and chunks[0]["text"] == "from c"


async def test_a_client_error_is_not_retried(tmp_path: Path) -> None:
    peers = Peers({"b": errors.BadRequestError("options.top_k must be an integer"), "c": "ok"})
    with pytest.raises(errors.BadRequestError):
        await collect(dispatcher(tmp_path, peers))
    assert peers.asked == ["b"]


async def test_a_peer_silent_before_its_first_chunk_is_left_for_the_next(tmp_path: Path) -> None:
    peers = Peers({"b": "hang", "c": "ok"})
    chunks = await asyncio.wait_for(collect(dispatcher(tmp_path, peers, first_token_timeout_s=0.2)), 10)
    assert peers.asked == ["b", "c"] and chunks[0]["text"] == "from c"


async def test_a_peer_silent_mid_stream_ends_it_with_a_clear_error(tmp_path: Path) -> None:
    peers = Peers({"b": "hang-after-one", "c": "ok"})
    got: list[dict[str, Any]] = []
    with pytest.raises(errors.StreamTimeoutError) as e:
        async with asyncio.timeout(10):
            req = InferenceRequest(kind="generate", model="m:latest", prompt="hi")
            async for c in dispatcher(tmp_path, peers, stream_idle_timeout_s=0.2)._run_routed(req, None):
                got.append(c)
    assert got == [{"text": "one "}] and peers.asked == ["b"]  # text was sent: no silent switch
    assert "stream_idle_timeout_s" in str(e.value) and e.value.status == 504


async def test_when_every_holder_fails_the_last_error_is_raised(tmp_path: Path) -> None:
    peers = Peers({"b": errors.OverloadedError("b busy"), "c": errors.PeerUnavailableError("c lost")})
    with pytest.raises(errors.PeerUnavailableError, match="c lost"):
        await collect(dispatcher(tmp_path, peers))


async def test_this_node_is_the_last_resort_when_it_holds_the_model(tmp_path: Path) -> None:
    peers = Peers({"b": errors.PeerUnavailableError("no connection to node 'b'")})
    d = dispatcher(tmp_path, peers, retries=0)
    d.advertised_models = ["m:latest"]
    d.engine.uses_store = True
    calls: list[str] = []

    async def local(req: InferenceRequest, record: Any) -> AsyncGenerator[dict[str, Any], None]:
        calls.append("local")
        yield {"text": "from a"}
        yield {"done": True}

    d._local_source = local  # type: ignore[method-assign]
    # b has the model loaded and a does not: b first, and retries=0 leaves no other try
    chunks = await collect(d)
    assert peers.asked == ["b"] and calls == ["local"] and chunks[0]["text"] == "from a"
