"""Running a request on this node's own engine: a slot from the fair queue
(or a refusal at its bound), the stream with its queue position and
continuation marks for the entry node, the slot freed and charged to the
tenant, the drain's cut. `Dispatcher` (dispatch.py) routes and forwards; it
calls `run_local` when this node is the holder chosen, and for requests its
peers forward here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from . import _core
from .config import Config
from .duration import parse_keep_alive
from .engines.base import CancelToken, Engine, InferenceRequest
from .engines.prefix import PromptAliases
from .errors import (
    BadRequestError,
    DrainingError,
    EngineError,
    OverloadedError,
    PeerUnavailableError,
    TenantLimitedError,
)
from .fairness import estimate_tokens, queue_view
from .metrics import Metrics
from .models.store import ModelRecord

logger = logging.getLogger(__name__)


class LocalRunner:
    """The local half of `Dispatcher`: admission to this node's engine slots
    and the run of a request on them. The state it uses is set up by
    `Dispatcher.__init__`."""

    cfg: Config
    node_id: str
    engine: Engine
    metrics: Metrics
    scheduler: _core.Scheduler
    draining: bool
    aliases: PromptAliases
    _tickets: itertools.count[int]
    _waiters: dict[int, asyncio.Future[int]]
    _waiting: dict[int, str]
    _cuts: set[Cut]
    _hold_s: float

    if TYPE_CHECKING:  # routing's side, in Dispatcher
        async def resolve(self, model: Any, local_only: bool = False) -> tuple[str, ModelRecord | None]: ...

        def elsewhere(self, model: str) -> bool: ...

    def is_idle(self, model: str) -> bool:
        return self.scheduler.in_flight(model) == 0 and self.scheduler.in_flight(f"{model}#embed") == 0

    # ---- admission -------------------------------------------------------------

    async def _acquire(self, key: str, req: InferenceRequest | None = None) -> tuple[int, int]:
        """A slot of `key` for `req` (None: an anonymous interactive one),
        waiting in the fair queue if need be: (slot, the place it had in the
        queue, 0 when it ran at once)."""
        req = req or InferenceRequest(kind="generate", model=key)
        ticket = next(self._tickets)
        now = int(time.monotonic() * 1000)
        slot = self.scheduler.admit(key, ticket, now, tenant=req.tenant, weight=req.weight,
                                    batch=req.priority == "batch", tokens=estimate_tokens(req))
        if slot >= 0:
            return int(slot), 0
        if slot == -3:
            waiting = self.scheduler.tenant_queued(req.tenant)
            after = min(60, max(1, math.ceil(waiting * self._hold_s / max(1, self.cfg.engine.num_parallel))))
            raise TenantLimitedError(
                f"too many requests queued for tenant {req.tenant or '-'!r}: {waiting} are waiting at node "
                f"{self.node_id}, its share of the queue (scheduler.tenant_queue_share of engine.max_queue); "
                f"retry in {after} s", retry_after=after)
        if slot == -2:
            raise OverloadedError(
                f"server busy: {self.scheduler.queue_depth()} requests are queued "
                f"(engine.max_queue={self.cfg.engine.max_queue}); retry later"
            )
        position = int(self.scheduler.position(key, ticket, now) or 0)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = fut
        self._waiting[ticket] = key
        try:
            return await fut, position
        except asyncio.CancelledError:
            if not self.scheduler.cancel(key, ticket) and fut.done() and not fut.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self._release(key, fut.result(), 0)
            raise
        finally:
            self._waiters.pop(ticket, None)
            self._waiting.pop(ticket, None)

    def cut_local(self) -> int:
        """The drain deadline: end every generation running here with an error
        that makes its entry node resume it elsewhere (mid-stream migration)."""
        for cut in list(self._cuts):
            cut.fire()
        return len(self._cuts)

    def _release(self, key: str, slot: int, tokens: int | None = None) -> None:
        """Free `slot`, charging the tokens the request took (None: the estimate)."""
        handed = self.scheduler.release(key, slot, int(time.monotonic() * 1000), tokens)
        if handed is not None:
            ticket, next_slot = handed
            fut = self._waiters.get(ticket)
            if fut is not None and not fut.done():
                fut.set_result(next_slot)
            else:  # the waiter vanished between cancel and release
                self._release(key, next_slot, 0)

    def queue(self) -> dict[str, Any]:
        """This node's requests running and queued, per model, and its tenants
        (GET /api/distributed/queue)."""
        return queue_view(self.scheduler, self.cfg, self.node_id)

    def keep_alive(self, req: InferenceRequest) -> float | None:
        default = parse_keep_alive(self.cfg.engine.keep_alive)
        if req.keep_alive is None:
            return default
        try:
            return parse_keep_alive(req.keep_alive, default or 0.0)
        except ValueError as e:
            raise BadRequestError(f"invalid keep_alive: {e}") from None

    async def run_local(self, req: InferenceRequest,
                        record: ModelRecord | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Run on this node's engine: take a slot, stream, free the slot."""
        if record is None and self.engine.uses_store:
            _, record = await self.resolve(req.model, local_only=True)
        keep_alive = self.keep_alive(req)
        if self.draining and self.elsewhere(req.model):
            # sent here before this node's draining advert reached the sender
            raise DrainingError(f"node {self.node_id} is draining; another node will take this")
        resumed: int | None = None
        if req.continuation:
            if not getattr(self.engine, "continues", False):
                raise EngineError(f"the {self.engine.kind} engine cannot resume a stream another node began")
            resumed = len(req.continuation)
        slot, place = await self._acquire(req.model, req)
        position: int | None = place
        held_from = time.monotonic()
        self.aliases.note(req, record)
        cancel = CancelToken()
        cut = Cut()
        self._cuts.add(cut)
        # what the request took, charged to its tenant on release: the final
        # chunk's counts, else (cut short) the prompt estimate and text so far
        taken: int | None = None
        texts = 0
        try:
            async with contextlib.aclosing(self.engine.generate(req, record, slot, cancel)) as chunks:
                async for chunk in cut.guard(chunks):
                    if position is not None:  # the entry node's X-Queue-Position
                        chunk["queue_position"] = position
                        position = None
                    if resumed is not None:  # tells the entry node this node understood the continuation
                        chunk["continued"] = resumed
                        resumed = None
                    if chunk.get("done"):
                        self._count_prompt(req.model, chunk)
                        # charged: what the engine evaluated (a warm prefix costs little) and generated
                        taken = int(chunk.get("prompt_eval_count") or 0) + int(chunk.get("eval_count") or 0)
                    elif "text" in chunk:
                        texts += len(chunk["tokens"]) if isinstance(chunk.get("tokens"), list) else 1
                    yield chunk
        except TimeoutError:
            if not cut.fired:
                raise
            raise PeerUnavailableError(f"node {self.node_id} is shutting down (node.drain_timeout_s passed); "
                                       "the stream resumes on another node") from None
        finally:
            self._cuts.discard(cut)
            cancel.cancel()
            if taken is None and texts:
                taken = estimate_tokens(dataclasses.replace(req, options={**req.options, "num_predict": texts}))
            self._hold_s += 0.2 * ((time.monotonic() - held_from) - self._hold_s)
            self._release(req.model, slot, taken)
            self.engine.touch(req.model, keep_alive)
            if keep_alive == 0 and self.is_idle(req.model):
                await self.engine.unload(req.model)

    def _count_prompt(self, model: str, final: dict[str, Any]) -> None:
        """Counts from this node's engine, once, here where it ran."""
        m = self.metrics
        if final.get("load_duration"):  # this request paid for a cold load
            m.model_load.labels(model).observe(final["load_duration"] / 1e9)
        m.prompt_tokens_evaluated.labels(model).inc(max(0, int(final.get("prompt_eval_count") or 0)))
        m.prompt_tokens_cached.labels(model).inc(max(0, int(final.get("prompt_cached_count") or 0)))

    async def _embed_local(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        if record is None and self.engine.uses_store:
            _, record = await self.resolve(req.model, local_only=True)
        keep_alive = self.keep_alive(req)
        key = f"{req.model}#embed"  # own slots: embeddings never wait behind generation
        slot, _ = await self._acquire(key, req)
        taken: int | None = None
        try:
            result = await self.engine.embed(req, record)
            taken = int(result.get("prompt_eval_count") or 0) or None
        finally:
            self._release(key, slot, taken)
        self.engine.touch(req.model, keep_alive)
        return result


class Cut:
    """Lets the drain end one local generation between two chunks: `guard`
    passes its chunks through and raises TimeoutError once `fire` is called
    (at once when waiting for the engine, else before the next chunk)."""

    def __init__(self) -> None:
        self.fired = False
        self._timeout: asyncio.Timeout | None = None
        self._waiting = False

    def fire(self) -> None:
        self.fired = True
        if self._waiting and self._timeout is not None:
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def guard(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        async with asyncio.timeout(None) as self._timeout:
            while True:
                if self.fired:
                    raise TimeoutError
                self._waiting = True
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self._waiting = False
                yield chunk
