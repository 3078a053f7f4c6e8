"""The one way in for every inference request.

Both APIs translate their wire format to an `InferenceRequest` and call
`Dispatcher.stream` or `Dispatcher.embed`. Here, once: resolve the model, ask
the Rust scheduler where it runs (a peer, or a local engine slot), queue or
refuse at the bound, stream chunks, stop on cancellation, count metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _core
from .config import Config
from .engines.base import Engine, InferenceRequest
from .engines.prefix import PromptAliases, routing_text
from .errors import (
    DrainingError,
    ModelNotFoundError,
    OllamaDistributedError,
    OverloadedError,
    PeerUnavailableError,
    StreamTimeoutError,
    TenantLimitedError,
)
from .local import Cut, LocalRunner
from .metrics import Metrics
from .models import names
from .models.store import ModelRecord, Store
from .security.limits import record_tokens

logger = logging.getLogger(__name__)

__all__ = ["NOTE", "Cut", "Dispatcher", "Progress", "RequestNote", "asker", "continued", "embed_parts",
           "is_empty", "note_model", "retryable"]

RECENT = 50  # requests kept for the dashboard's "recent requests"
# Embeddings cross between nodes in parts of about this many bytes of JSON, so
# a large batch never makes a frame the receiver would refuse (16 MiB).
EMBED_PART_BYTES = 4 << 20


def retryable(e: OllamaDistributedError) -> bool:
    """May a request that failed this way, before its first chunk, go to the
    next holder? Yes for anything about the node (lost, busy, its copy just
    trimmed, wedged, broken); no for the client's own mistake (4xx), which
    would fail the same way everywhere. A tenant over its share of one node's
    queue (429) may still find room at another."""
    return isinstance(e, ModelNotFoundError | TenantLimitedError) or e.status >= 500


def is_empty(req: InferenceRequest) -> bool:
    """A request with nothing to run: Ollama's way to load or unload a model."""
    if req.kind == "embed":
        return not req.input
    if req.kind == "chat":
        return not req.messages
    return not req.prompt and not req.raw and not req.suffix


class Remote(Protocol):
    """The cluster's forwarding surface (ClusterService), as the dispatcher uses it."""

    def forward(self, node_id: str, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]: ...


@dataclass
class RequestRecord:
    at: float
    model: str
    endpoint: str
    status: int
    node: str
    prompt_tokens: int = 0
    tokens: int = 0
    duration: float = 0.0
    ttft: float | None = None
    started: float = 0.0  # perf_counter at arrival


@dataclass
class RequestNote:
    """What one HTTP request's handler learnt, for the API's access log and its
    count: the model it named, and the dispatcher's outcome when the dispatcher
    ran it (a stream that fails after its headers were sent answered 200 but
    counts as the failure it was)."""

    model: str = ""
    status: int | None = None
    # Who asks (api/tenancy.py) and, once known, the place the request had in
    # a node's queue (0: it ran at once), for the X-Queue-Position header.
    tenant: str = ""
    weight: float = 1.0
    priority: str = "interactive"
    queue_position: int | None = None


#: Set by the API's access middleware around each handler; None for a request
#: forwarded by a peer (the dispatcher counts those itself).
NOTE: contextvars.ContextVar[RequestNote | None] = contextvars.ContextVar("request_note", default=None)


def asker(req: InferenceRequest) -> RequestNote | None:
    """Give `req` the tenant and priority the API found for the current HTTP
    request (api/tenancy.py), unless it has them (a peer's, a playground's)."""
    note = NOTE.get()
    if note is not None and not req.tenant:
        req.tenant, req.weight, req.priority = note.tenant, note.weight, note.priority
    return note


def note_model(model: Any) -> None:
    """Name the model the current HTTP request is about (for its log line and count)."""
    note = NOTE.get()
    if note is not None and isinstance(model, str) and not note.model:
        note.model = model


class Dispatcher(LocalRunner):
    def __init__(self, cfg: Config, node_id: str, store: Store, engine: Engine,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.scheduler = _core.Scheduler(node_id, cfg.engine.num_parallel, cfg.engine.max_queue,
                                         cfg.scheduler.stale_after_ms)
        self.scheduler.set_policy(cfg.scheduler.policy)
        self.remote: Remote | None = None
        self._upstream_names: list[str] = []
        self._tickets = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self.recent: collections.deque[RequestRecord] = collections.deque(maxlen=RECENT)
        self.requests_total = 0
        self.requests_by_model: collections.Counter[str] = collections.Counter()
        self.tokens_total = 0
        self.text_chunks = 0  # streamed text chunks, live (tokens_total counts at the end)
        self.started_at = time.time()
        self.advertised_models: list[str] = []  # this node's models, as its last advert said
        # Graceful drain (Node.drain): routing sends nothing new here while peers
        # can take it, queued requests go elsewhere, and at the deadline the
        # generations still running here are cut so their entry nodes migrate them.
        self.draining = False
        self.active = 0  # generate/chat/embed requests under way here, as the entry or for a peer
        self._waiting: dict[int, str] = {}  # ticket -> slot key, of requests queued for a slot
        self._cuts: set[Cut] = set()  # local generations running now
        self._hold_s = 1.0  # a local slot's mean hold time (EWMA), for a 429's Retry-After
        self.scheduler.configure_fairness(cfg.scheduler.tenant_queue_share,
                                          int(cfg.scheduler.batch_promote_after_s * 1000))
        self.aliases = PromptAliases()  # for the advert's warm prefixes (Node.prefix_hashes)
        metrics.bind(queue_depth=self.scheduler.queue_depth,
                     in_flight=self.scheduler.total_in_flight,
                     models_loaded=lambda: len(self.engine.loaded()))
        metrics.bind_routing(self.scheduler.routing_decisions)

    # ---- configuration ---------------------------------------------------------

    def reconfigure(self, cfg: Config) -> None:
        """Apply the live-changeable knobs (SIGHUP)."""
        self.cfg = cfg
        self.scheduler.configure(cfg.engine.num_parallel, cfg.engine.max_queue,
                                 cfg.scheduler.stale_after_ms)
        self.scheduler.configure_fairness(cfg.scheduler.tenant_queue_share,
                                          int(cfg.scheduler.batch_promote_after_s * 1000))
        if cfg.scheduler.policy != self.scheduler.policy:
            self.scheduler.set_policy(cfg.scheduler.policy)
        self.engine.configure(cfg.engine.num_parallel, cfg.engine.max_loaded_models)

    # ---- models ----------------------------------------------------------------

    async def resolve(self, model: Any, local_only: bool = False) -> tuple[str, ModelRecord | None]:
        """The model's display name and local store record (None when only
        peers or an upstream hold it); 404 when it is nowhere."""
        name = names.parse(model)
        if self.engine.uses_store:
            try:
                rec = self.store.get(name.short)  # a stat while cached; small files otherwise
                return rec.name.short, rec
            except ModelNotFoundError:
                if self.remote is not None and not local_only and self._held_by_peers(name.short):
                    return name.short, None
                raise ModelNotFoundError(str(model)) from None  # the name as the client gave it
        listed = await self.engine.list_models()
        wanted = {model, name.short}
        for m in listed:
            if m.get("name") in wanted or m.get("model") in wanted:
                return str(m["name"]), None
        if self.remote is not None and not local_only and self._held_by_peers(name.short):
            return name.short, None
        raise ModelNotFoundError(str(model))

    def _held_by_peers(self, model: str) -> bool:
        try:
            self.scheduler.route(model, int(time.time() * 1000))
        except ModelNotFoundError:
            return False
        except OverloadedError:
            return True  # held, but busy: routing answers 503 later
        return True

    def local_models(self) -> list[str]:
        """Models this node can serve, for its advert."""
        if self.engine.uses_store:
            return [n.short for n in self.store.names()]
        return list(self._upstream_names)

    async def refresh_upstream(self) -> None:
        """Re-read an upstream engine's model list (cached by the engine)."""
        if self.engine.uses_store:
            return
        try:
            self._upstream_names = [str(m["name"]) for m in await self.engine.list_models()]
        except OllamaDistributedError as e:
            logger.warning("cannot list the upstream's models: %s", e)
            self._upstream_names = []

    def update_local(self) -> None:
        """This node's own entry in the router, from live counts rather than
        the last advert (a second old), so routing sees its real load."""
        loaded = [m.name for m in self.engine.loaded()]
        # Draining: shown to the router as saturated, so a peer that holds the
        # model is chosen, and this node only when none can take it.
        depth, bound = (1, 1) if self.draining else (self.scheduler.queue_depth(), self.cfg.engine.max_queue)
        self.scheduler.update_node(self.node_id, True, int(time.time() * 1000), self.advertised_models,
                                   loaded, self.scheduler.total_in_flight(), depth, bound,
                                   max_loaded_models=self.cfg.engine.max_loaded_models,
                                   busy=[m for m in loaded if not self.is_idle(m)])

    def elsewhere(self, model: str) -> bool:
        """Can a peer take a request for `model` now (while this node drains)?"""
        if self.remote is None:
            return False
        self.update_local()
        try:
            order = self.scheduler.route(model, int(time.time() * 1000))
        except OllamaDistributedError:
            return False
        return any(n != self.node_id for n in order)

    def shed_queue(self) -> int:
        """Draining: the requests queued here for a slot leave the queue with a
        503 their entry node retries on another holder (nothing was sent yet).
        Those for a model no peer can take stay and are served here."""
        shed = 0
        for ticket, key in list(self._waiting.items()):
            fut = self._waiters.get(ticket)
            if fut is None or fut.done() or not self.elsewhere(key.split("#", 1)[0]):
                continue
            if self.scheduler.cancel(key, ticket):
                fut.set_exception(DrainingError(f"node {self.node_id} is draining; another node will take this"))
                shed += 1
        return shed

    # ---- inference -------------------------------------------------------------

    def count(self, model: str, endpoint: str, status: int, duration: float) -> None:
        """Count one request, whatever its endpoint and status: once per request."""
        self.requests_total += 1
        self.metrics.requests.labels(model, endpoint, str(status)).inc()
        self.metrics.request_duration.labels(endpoint).observe(duration)

    def _record(self, rec: RequestRecord) -> None:
        self.recent.append(rec)
        self.requests_by_model[rec.model] += 1
        self.tokens_total += rec.tokens
        m = self.metrics
        note = NOTE.get()
        if note is not None:  # an HTTP request: the access middleware counts it when its response is done
            note.model, note.status = rec.model, rec.status
        else:
            self.count(rec.model, rec.endpoint, rec.status, rec.duration)
        if rec.ttft is not None:
            m.ttft.labels(rec.model).observe(rec.ttft)
        if rec.prompt_tokens:
            m.prompt_tokens.labels(rec.model).inc(rec.prompt_tokens)
        if rec.tokens:
            m.generated_tokens.labels(rec.model).inc(rec.tokens)
        record_tokens(rec.prompt_tokens + rec.tokens)  # the API key's tokens-per-minute bucket, if any

    @contextlib.contextmanager
    def _tracked(self, req: InferenceRequest, endpoint: str) -> Iterator[RequestRecord]:
        """Count one request on every path: its status, duration and tokens."""
        rec = RequestRecord(at=time.time(), model=str(req.model), endpoint=endpoint, status=200,
                            node=self.node_id, started=time.perf_counter())
        try:
            yield rec
        except OllamaDistributedError as e:
            rec.status = e.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            rec.status = 499  # client closed the request (nginx's convention)
            raise
        except Exception:
            rec.status = 500
            raise
        finally:
            rec.duration = time.perf_counter() - rec.started
            self._record(rec)

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def stream(self, req: InferenceRequest, endpoint: str) -> AsyncIterator[dict[str, Any]]:
        """Run a generate or chat request and yield its chunks.

        Errors before the first chunk raise, so the API can still answer with a
        status code; after it they end the stream.
        """
        with self._tracked(req, endpoint) as rec, self._counted():
            model, record = await self.resolve(req.model)
            rec.model = req.model = model
            if is_empty(req):
                yield await self._preload(req, record)
                return
            note = asker(req)
            first = True
            async for chunk in self._run(req, record):
                position = chunk.pop("queue_position", None)
                if note is not None and note.queue_position is None and isinstance(position, int):
                    note.queue_position = position
                if "text" in chunk:
                    self.text_chunks += 1  # live, for the dashboard's tokens/s chart (web/app.py)
                if first and "text" in chunk:
                    rec.ttft = time.perf_counter() - rec.started
                    first = False
                if chunk.get("done"):
                    rec.prompt_tokens = int(chunk.get("prompt_eval_count") or 0)
                    rec.tokens = int(chunk.get("eval_count") or 0)
                    if first:
                        rec.ttft = time.perf_counter() - rec.started
                chunk.pop("tokens", None)  # for migration (see Progress), not for the client
                yield chunk

    async def preload(self, req: InferenceRequest, endpoint: str) -> dict[str, Any]:
        """An empty request (no prompt, messages or input): load the model, or
        unload it with keep_alive 0, wherever it is held. Ollama answers with
        done_reason "load" or "unload"."""
        with self._tracked(req, endpoint) as rec:
            model, record = await self.resolve(req.model)
            rec.model = req.model = model
            return await self._preload(req, record)

    async def _preload(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        if record is not None or self.remote is None or not self.engine.uses_store:
            return await self._load_or_unload(req, record)
        # Held only by peers: routed like inference. An unload goes to every
        # holder (any of them may have it loaded); a load to the best one.
        unload = self.keep_alive(req) == 0
        if unload:
            for node in self.scheduler.route(req.model, int(time.time() * 1000)):
                try:
                    async for _ in self.remote.forward(node, req.to_dict()):
                        pass
                except OllamaDistributedError as e:
                    logger.warning("node %s could not unload %s: %s", node, req.model, e)
            return {"done": True, "done_reason": "unload"}
        final: dict[str, Any] = {"done": True, "done_reason": "load"}
        async for chunk in self._run_routed(req, record):
            final = chunk
        return final

    async def _load_or_unload(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        keep_alive = self.keep_alive(req)
        if keep_alive == 0:
            await self.engine.unload(req.model)  # requests under way finish first (engines/llamacpp.py)
            self.scheduler.forget(req.model)
            return {"done": True, "done_reason": "unload"}
        t0 = time.perf_counter()
        took = await self.engine.load(req, record)
        if took:
            self.metrics.model_load.labels(req.model).observe(took)
        self.engine.touch(req.model, keep_alive)
        return {"done": True, "done_reason": "load", "load_duration": int(took * 1e9),
                "total_duration": int((time.perf_counter() - t0) * 1e9)}

    async def _run(self, req: InferenceRequest,
                   record: ModelRecord | None) -> AsyncIterator[dict[str, Any]]:
        if self.remote is not None:
            async for chunk in self._run_routed(req, record):
                yield chunk
            return
        async with contextlib.aclosing(self.run_local(req, record)) as chunks:
            async for chunk in self._timed(chunks, self.node_id):
                yield chunk

    async def _timed(self, chunks: AsyncGenerator[dict[str, Any], None],
                     node: str) -> AsyncIterator[dict[str, Any]]:
        """`chunks`, ended with a clear error when the first one takes longer than
        scheduler.first_token_timeout_s or a later one stream_idle_timeout_s: a
        wedged node never hangs the client. The clock stops while the client
        reads a chunk (a slow reader is not a wedged node)."""
        sc = self.cfg.scheduler
        loop = asyncio.get_running_loop()
        first = True
        try:
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(loop.time() + (sc.first_token_timeout_s if first
                                                       else sc.stream_idle_timeout_s))
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        return
                    deadline.reschedule(None)
                    first = False
                    yield chunk
        except TimeoutError:
            if deadline.expired():
                phase = "first_chunk" if first else "idle"
                self.metrics.stream_timeouts.labels(phase).inc()
                if first:
                    raise StreamTimeoutError(
                        f"node {node} gave no answer for {req_s(sc.first_token_timeout_s)} "
                        "(scheduler.first_token_timeout_s)") from None
                raise StreamTimeoutError(
                    f"node {node} stopped sending for {req_s(sc.stream_idle_timeout_s)} mid-stream "
                    "(scheduler.stream_idle_timeout_s); the answer is incomplete") from None
            raise

    async def _run_routed(self, req: InferenceRequest,
                          record: ModelRecord | None) -> AsyncIterator[dict[str, Any]]:
        """Try holders best first. Before the first chunk a failure moves the
        request to the next holder (up to scheduler.retries); after it, the
        stream migrates (up to scheduler.migration_limit): the next holder gets
        the prompt plus the token ids generated so far and goes on from there,
        and its chunks are spliced into the client's stream (see `Progress`)."""
        assert self.remote is not None
        sc = self.cfg.scheduler
        progress = Progress(resumable=req.kind in ("generate", "chat") and not req.format)
        retries_left = max(0, sc.retries)
        tried: list[str] = []
        last: OllamaDistributedError | None = None
        force: str | None = None
        prompt = routing_text(req, record)  # the prefix a warm node skips evaluating
        while True:
            node = force or self._next_holder(req.model, tried, last, revisit=progress.sent, prompt=prompt)
            force = None
            if node is None:
                assert last is not None
                raise last
            if last is not None:
                kind = "ongoing" if progress.sent else "new"
                self.metrics.migrations.labels(kind).inc()
                logger.warning("%s of %s moves from node %s to node %s after %d tokens (%s: %s)",
                               "stream" if progress.sent else "request", req.model, tried[-1], node,
                               len(progress.tokens), last.status, last)
            tried.append(node)
            sub: InferenceRequest | None = continued(req, progress.tokens) if progress.sent else req
            if sub is None:  # every token asked for is already out: only the final chunk was lost
                yield progress.final()
                return
            try:
                async for chunk in self._attempt(node, sub, record, progress):
                    yield chunk
                return
            except OllamaDistributedError as e:
                progress.lost()
                if not retryable(e):
                    raise
                if not progress.sent:
                    if retries_left <= 0:
                        if self.node_id in tried or not self._holds(req.model):
                            raise
                        force = self.node_id  # this node holds it too: the last resort needs no network
                    retries_left -= 1
                elif not progress.resumable or progress.migrations >= sc.migration_limit:
                    if progress.resumable:
                        logger.warning("stream of %s lost at node %s after %d tokens: "
                                       "scheduler.migration_limit (%d) reached", req.model, node,
                                       len(progress.tokens), sc.migration_limit)
                    raise
                else:
                    progress.migrations += 1
                last = e

    def _holds(self, model: str) -> bool:
        """This node is among the model's holders the router knows."""
        try:
            return self.node_id in self.scheduler.route(model, int(time.time() * 1000))
        except OllamaDistributedError:
            return False

    def _next_holder(self, model: str, tried: list[str], last: OllamaDistributedError | None,
                     revisit: bool = False, prompt: str | None = None) -> str | None:
        """The best holder not tried yet for this request, else, for a
        migration (`revisit`: two holders, a transient failure on each), the
        best but the one that just failed; None when none is left. The first choice raises the scheduler's own
        error (404, 503). `prompt` (engines/prefix.py) ranks nodes with more
        of it warm first under scheduler.policy prefix_aware."""
        self.update_local()
        try:
            order = self.scheduler.route(model, int(time.time() * 1000), prompt)
        except OllamaDistributedError:
            if last is None:
                raise
            return None  # nowhere else to go: the failure that brought us here is the answer
        fresh = [n for n in order if n not in tried]
        if fresh or not tried or not revisit:
            return fresh[0] if fresh else None
        return next((n for n in order if n != tried[-1]), None)

    async def _attempt(self, node: str, req: InferenceRequest, record: ModelRecord | None,
                       progress: Progress) -> AsyncIterator[dict[str, Any]]:
        """One node's run of `req`, its chunks noted in `progress`."""
        assert self.remote is not None
        remote = node != self.node_id
        resumed = len(req.continuation)
        confirm = resumed > 0
        self.scheduler.dispatched(node)
        try:
            source = self.remote.forward(node, req.to_dict()) if remote else self._local_source(req, record)
            async with contextlib.aclosing(source) as chunks:
                async for chunk in self._timed(chunks, node):
                    if confirm:
                        if chunk.pop("continued", None) != resumed:
                            # a node from before migration existed: it ignored the
                            # tokens and started over, which would repeat the text
                            raise PeerUnavailableError(f"node {node} cannot resume a stream (an older version?)")
                        confirm = False
                    progress.note(chunk)
                    if chunk.get("done") and progress.migrations:
                        chunk = progress.merged(chunk, resumed)
                    yield chunk
            if remote:
                self.metrics.forwarded.labels(node, "ok").inc()
        except OllamaDistributedError as e:
            if remote:
                self.metrics.forwarded.labels(node, "retry" if not progress.sent else "failed").inc()
            if not progress.sent:
                logger.warning("node %s could not take %s (%s: %s)", node, req.model, e.status, e)
            raise
        finally:
            self.scheduler.finished(node)

    async def _local_source(self, req: InferenceRequest,
                            record: ModelRecord | None) -> AsyncGenerator[dict[str, Any], None]:
        if req.kind == "embed":
            yield await self._embed_local(req, record)
            return
        async for chunk in self.run_local(req, record):
            yield chunk

    async def embed(self, req: InferenceRequest, endpoint: str) -> dict[str, Any]:
        with self._tracked(req, endpoint) as rec, self._counted():
            model, record = await self.resolve(req.model)
            rec.model = req.model = model
            asker(req)
            if self.remote is None:
                result = await self._embed_local(req, record)
            else:
                result = await self._embed_routed(req, record)
            rec.prompt_tokens = int(result.get("prompt_eval_count") or 0)
            return result

    async def _embed_routed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        """Embeddings may come in parts (see `handle_inbound`): joined here."""
        vectors: list[Any] = []
        result: dict[str, Any] | None = None
        async for chunk in self._run_routed(req, record):
            if "embeddings" in chunk:
                vectors.extend(chunk["embeddings"])
                result = chunk
        if result is None:
            raise PeerUnavailableError(f"no node returned embeddings for {req.model}")
        return {**result, "embeddings": vectors}

    async def handle_inbound(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A request forwarded by a peer: run it here, counted here."""
        req = InferenceRequest.from_dict(request)
        with self._tracked(req, f"peer:{req.kind}") as rec, self._counted():
            _, record = await self.resolve(req.model, local_only=True)
            if is_empty(req):
                yield await self._load_or_unload(req, record)
                return
            if req.kind == "embed":
                result = await self._embed_local(req, record)
                rec.prompt_tokens = int(result.get("prompt_eval_count") or 0)
                for part in embed_parts(result):
                    yield part
                return
            async for chunk in self.run_local(req, record):
                if chunk.get("done"):
                    rec.prompt_tokens = int(chunk.get("prompt_eval_count") or 0)
                    rec.tokens = int(chunk.get("eval_count") or 0)
                elif rec.ttft is None:
                    rec.ttft = time.perf_counter() - rec.started
                yield chunk


@dataclass
class Progress:
    """What the entry node keeps of one routed stream so that another holder
    can resume it: the token ids the client's text came from. `resumable`
    turns False once a chunk arrives without its ids (an upstream engine, a
    tool call) or the request cannot be replayed token for token (a `format`
    grammar restarts from its first state)."""

    resumable: bool = True
    sent: bool = False  # a chunk reached the client: a failure now is a migration, not a retry
    tokens: list[int] = field(default_factory=list)
    migrations: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_chunk_at: float | None = None
    last_chunk_at: float = 0.0
    eval_s: float = 0.0  # generation time on the nodes that failed (their final never came)

    def note(self, chunk: dict[str, Any]) -> None:
        ids = chunk.get("tokens")
        if isinstance(ids, list):
            self.tokens.extend(ids)
        elif "text" in chunk or "thinking" in chunk or "tool_calls" in chunk:
            self.resumable = False
        now = time.perf_counter()
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        self.last_chunk_at = now
        if not self.sent and not self.tokens and not chunk.get("done"):
            self.resumable = False  # something went out that no token id stands for
        self.sent = True

    def lost(self) -> None:
        """The node serving this stream failed: count its generation time."""
        if self.first_chunk_at is not None:
            self.eval_s += self.last_chunk_at - self.first_chunk_at
            self.first_chunk_at = None

    def merged(self, final: dict[str, Any], resumed: int) -> dict[str, Any]:
        """The last node's final chunk, its counts made the whole request's:
        `eval_count` the total, durations from the entry node's clock where
        a lost node's own figures never came; done_reason stays the last node's."""
        out = dict(final)
        out["eval_count"] = int(final.get("eval_count") or 0) + resumed
        out["eval_duration"] = int(final.get("eval_duration") or 0) + int(self.eval_s * 1e9)
        out["total_duration"] = int((time.perf_counter() - self.started) * 1e9)
        return out

    def final(self) -> dict[str, Any]:
        """The final chunk when the stream broke after its last token but before it."""
        return {"done": True, "done_reason": "length", "prompt_eval_count": 0, "prompt_eval_duration": 0,
                "eval_count": len(self.tokens), "eval_duration": int(self.eval_s * 1e9), "load_duration": 0,
                "total_duration": int((time.perf_counter() - self.started) * 1e9)}


def continued(req: InferenceRequest, tokens: list[int]) -> InferenceRequest | None:
    """`req` resumed after `tokens`: the same prompt and options, the ids
    appended (raw, no template re-render) and num_predict reduced by them;
    None when num_predict is already used up."""
    options = dict(req.options)
    n = options.get("num_predict")
    if isinstance(n, int | float) and not isinstance(n, bool) and n > 0:
        if n - len(tokens) <= 0:
            return None
        options["num_predict"] = int(n) - len(tokens)
    return dataclasses.replace(req, continuation=list(tokens), options=options)


def req_s(seconds: float) -> str:
    return f"{seconds:g}s"


def embed_parts(result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`result` as chunks of at most ~EMBED_PART_BYTES of vectors each, the
    stats on the last; joined again by `Dispatcher._embed_routed`."""
    vectors = result.get("embeddings") or []
    dims = max(1, len(vectors[0]) if vectors else 1)
    per = max(1, EMBED_PART_BYTES // (24 * dims))  # a float is at most ~24 bytes of JSON
    starts = list(range(0, len(vectors), per)) or [0]
    for i in starts[:-1]:
        yield {"embeddings": vectors[i:i + per]}
    yield {**result, "embeddings": vectors[starts[-1]:]}
