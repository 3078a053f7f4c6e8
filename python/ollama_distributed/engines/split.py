"""One model across machines (issue 16): when to split, and running a split.

A model whose weights exceed this node's budget (`engine.max_model_memory_mib`,
default: the machine's memory) is loaded across this node and the fewest peers
whose RPC servers (`engine.rpc_server`, engines/rpc.py) offer enough memory,
preferring peers that hold the model's blob. A model that fits this node is
never split; when the cluster has not the memory, the request gets a 507
naming the memory needed and available, and nothing is loaded.

The split model runs in a child process of its own (`split_worker.py`): it
registers the peers' RPC servers, reached through the cluster core's tunnels
(a loopback listener per part, bridged over the pair's mTLS QUIC connection,
rust/tunnel/), and loads the model with llama.cpp putting its last
`n_gpu_layers` layers on those RPC devices in proportion `tensor_split` and the
rest on this node's CPU. A child, because llama.cpp's RPC client aborts its
process when a server it uses goes away (and device registration is
process-wide and final): a part that dies ends the child, whose requests end
with a clear error, never the node. The child runs the same LlamaCppEngine as
the node (templates, tools, stop sequences, continuation), so its chunks are
the engine's own, relayed as JSON lines.

Shares are in proportion to each part's memory budget: this node's
`max_model_memory_mib`, a peer's advertised `rpc_memory_mib`. Layers are
assigned the same way (llama.cpp counts the output layer as one more), so no
part holds more than its budget. A split model serves one request at a time
(one context: each extra llama.cpp context would load the weights onto the
RPC servers once more).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ..config import EngineSection
from ..errors import EngineError, NotAvailableError, OllamaDistributedError, from_status
from ..models import gguf_info
from ..models.store import ModelRecord
from .base import CancelToken, InferenceRequest, LoadedModel

logger = logging.getLogger(__name__)

MIB = 1 << 20
# How long a child may take to load a split model: the remote layers' weights
# cross the tunnel once (tens of MB/s on a loaded 2-core machine, ~1 GB/s on
# a quiet one); a bound on liveness, not on speed.
LOAD_TIMEOUT_S = 600.0
STOP_GRACE_S = 5.0
# Lines of a child's stderr kept for the error that reports its death.
STDERR_TAIL = 40


class InsufficientMemoryError(OllamaDistributedError):
    """The cluster has not the memory for a model (507 Insufficient Storage,
    as WebDAV uses it for a server that cannot hold what was asked)."""

    status = 507

    def __init__(self, model: str, need_mib: int, available_mib: int, detail: str) -> None:
        super().__init__(f"model '{model}' needs {need_mib} MiB of memory but the cluster has "
                         f"{available_mib} MiB available for it ({detail})")
        self.need_mib = need_mib
        self.available_mib = available_mib


@dataclass(frozen=True)
class Candidate:
    """A node that could hold a share: its budget, and whether it has the blob."""

    node: str
    memory_mib: int
    holds: bool = False


@dataclass
class Part:
    """One node's share of a split model."""

    node: str
    memory_mib: int  # its budget
    share_mib: int  # of the model's weights
    layers: int  # of llama.cpp's n_layer + 1
    local: bool = False
    port: int | None = None  # the tunnel's loopback port (None: this node's CPU)

    def as_json(self) -> dict[str, Any]:
        return {"node": self.node, "local": self.local, "memory_mib": self.memory_mib,
                "share_mib": self.share_mib, "layers": self.layers}


def local_budget_mib(cfg: EngineSection) -> int:
    """engine.max_model_memory_mib, else the machine's memory."""
    return cfg.max_model_memory_mib or int(psutil.virtual_memory().total // MIB)


def need_mib(record: ModelRecord) -> int:
    """The memory a model's weights take (its layers' bytes), in MiB."""
    return max(1, math.ceil(record.size / MIB))


def choose(model: str, need: int, local: Candidate, peers: Iterable[Candidate]) -> list[Candidate] | None:
    """None when the model fits this node (never split); else this node first
    and the fewest peers whose budgets hold the rest, as many blob holders
    among them as a set that small allows. InsufficientMemoryError when even
    every peer together is not enough."""
    if local.memory_mib >= need:
        return None
    pool = [p for p in peers if p.memory_mib > 0 and p.node != local.node]
    by_size = sorted(pool, key=lambda p: (-p.memory_mib, p.node))
    total, k = local.memory_mib, 0
    for p in by_size:
        if total >= need:
            break
        total, k = total + p.memory_mib, k + 1
    if total < need:
        detail = (f"{local.node}: {local.memory_mib} MiB (engine.max_model_memory_mib)"
                  + "".join(f", {p.node}: {p.memory_mib} MiB (rpc)" for p in by_size)
                  + ("" if by_size else "; no peer offers memory over RPC (engine.rpc_server)"))
        raise InsufficientMemoryError(model, need, total, detail)
    holders = [p for p in by_size if p.holds]
    others = [p for p in by_size if not p.holds]
    for h in range(min(k, len(holders)), -1, -1):
        pick = holders[:h] + others[:k - h]
        if len(pick) == k and local.memory_mib + sum(p.memory_mib for p in pick) >= need:
            return [local, *pick]
    return [local, *by_size[:k]]  # pragma: no cover - the loop's h = 0 is by_size's top k


def shares(need: int, chosen: list[Candidate], n_layers: int) -> list[Part]:
    """Each part's share of the weights and of the `n_layers` + 1 layers, in
    proportion to its budget (largest remainders; every part at least one)."""
    total = sum(c.memory_mib for c in chosen)
    slots = n_layers + 1
    exact = [slots * c.memory_mib / total for c in chosen]
    layers = [max(1, int(x)) for x in exact]
    order = sorted(range(len(chosen)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(layers) < slots:
        layers[order[i % len(order)]] += 1
        i += 1
    while sum(layers) > slots:  # the floor of one pushed it over: take from the largest
        j = max(range(len(layers)), key=lambda x: layers[x])
        layers[j] -= 1
    return [Part(node=c.node, memory_mib=c.memory_mib, share_mib=math.ceil(need * c.memory_mib / total),
                 layers=n, local=(i == 0)) for i, (c, n) in enumerate(zip(chosen, layers, strict=True))]


def block_count(record: ModelRecord) -> int:
    """The model's transformer blocks (GGUF `<arch>.block_count`)."""
    if record.model_path is None:
        raise EngineError(f"model '{record.name.short}' has no model file in the store")
    info = gguf_info.read(record.model_path)
    meta = info.get("model_info") or {}
    n = meta.get(f"{info.get('family')}.block_count")
    if not isinstance(n, int) or n <= 0:
        raise EngineError(f"model '{record.name.short}' does not say its layer count (block_count): "
                          "it cannot be split")
    return n


def candidates(nodes: list[dict[str, Any]], checked: Callable[[dict[str, Any]], dict[str, Any] | None],
               me: str, model: str) -> list[Candidate]:
    """Peers that are alive and serve RPC, from the cluster's node list and
    each one's checked advert."""
    out = []
    for n in nodes:
        if n.get("local") or n.get("id") == me or not n.get("alive"):
            continue
        adv = checked(n)
        if not adv or not adv.get("rpc_ready") or int(adv.get("rpc_memory_mib") or 0) <= 0:
            continue
        out.append(Candidate(n["id"], int(adv["rpc_memory_mib"]), model in (adv.get("models") or [])))
    return out


# ---- running a split model --------------------------------------------------------


@dataclass
class _Call:
    id: int
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class SplitModel:
    """A child process holding one split model; requests go to it as JSON lines."""

    def __init__(self, record: ModelRecord, parts: list[Part], n_ctx: int | None, cfg: EngineSection,
                 models_dir: Path) -> None:
        self.record = record
        self.parts = parts
        self.n_ctx = n_ctx
        self.cfg = cfg
        self.models_dir = models_dir
        self.expires_at: float | None = None
        self.load_duration = 0.0
        self.context_length = 0
        self.error: str | None = None  # why the child is gone
        self.lock = asyncio.Lock()  # one request at a time (one context)
        self._proc: asyncio.subprocess.Process | None = None
        self._calls: dict[int, _Call] = {}
        self._ids = 0
        self._stderr: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def alive(self) -> bool:
        return (self._proc is not None and self._proc.returncode is None and self.error is None
                and not self._stopping)

    def spec(self) -> dict[str, Any]:
        remote = [p for p in self.parts if not p.local]
        engine = dataclasses.asdict(self.cfg)
        engine.update(num_parallel=1, max_loaded_models=1)
        return {
            "model": self.record.name.short, "models_dir": str(self.models_dir), "engine": engine,
            "ports": [p.port for p in remote], "n_gpu_layers": sum(p.layers for p in remote),
            "tensor_split": [float(p.layers) for p in remote], "num_ctx": self.n_ctx,
        }

    async def start(self) -> None:
        """Start the child and wait until the model is loaded (EngineError if it fails)."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ollama_distributed.engines.split_worker", "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=64 * MIB)
        self._tasks = [asyncio.create_task(self._read_stdout(), name="split-stdout"),
                       asyncio.create_task(self._read_stderr(), name="split-stderr")]
        ready = self._call_nowait({"op": "load", "spec": self.spec()})
        try:
            first = await asyncio.wait_for(ready.queue.get(), LOAD_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise EngineError(f"loading '{self.record.name.short}' split across "
                              f"{', '.join(p.node for p in self.parts)} took over {LOAD_TIMEOUT_S:.0f}s") from None
        if "error" in first:
            await self.stop()
            raise _error(first["error"])
        self.load_duration = float(first.get("load_s", 0.0))
        self.context_length = int(first.get("n_ctx", 0))
        logger.info("loaded %s split across %s in %.2fs", self.record.name.short,
                    ", ".join(f"{p.node} ({p.layers} layers, {p.share_mib} MiB)" for p in self.parts),
                    self.load_duration)

    def _call_nowait(self, msg: dict[str, Any]) -> _Call:
        if self._proc is None or self._proc.stdin is None or not self.alive:
            raise EngineError(self.error or "the split model's process is not running")
        self._ids += 1
        call = self._calls[self._ids] = _Call(self._ids)
        self._proc.stdin.write((json.dumps({"id": self._ids, **msg}) + "\n").encode())
        return call

    async def generate(self, req: InferenceRequest, cancel: CancelToken) -> AsyncGenerator[dict[str, Any], None]:
        call = self._call_nowait({"op": "generate", "request": req.to_dict()})
        cid = call.id
        done = False
        get: asyncio.Future[dict[str, Any]] | None = None
        try:
            while True:
                get = asyncio.ensure_future(call.queue.get())
                while not get.done():
                    # the cancel token is set from another thread: look at it
                    # while waiting (the child stops at its next token)
                    await asyncio.wait([get], timeout=0.25)
                    if cancel.cancelled and not get.done():
                        self._send({"id": cid, "op": "cancel"})
                msg = get.result()
                if "chunk" in msg:
                    yield msg["chunk"]
                elif "error" in msg:
                    done = True
                    raise _error(msg["error"])
                else:
                    done = True
                    return
        finally:
            if get is not None and not get.done():
                get.cancel()
            if not done:
                self._send({"id": cid, "op": "cancel"})
            self._calls.pop(cid, None)

    def _send(self, msg: dict[str, Any]) -> None:
        if self._proc is not None and self._proc.stdin is not None and self.alive:
            with contextlib.suppress(Exception):
                self._proc.stdin.write((json.dumps(msg) + "\n").encode())

    async def _read_stdout(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        async for line in proc.stdout:
            try:
                msg = json.loads(line)
                call = self._calls.get(int(msg["id"]))
            except (ValueError, KeyError, TypeError):
                logger.warning("split worker: unreadable line %r", line[:200])
                continue
            if call is not None:
                call.queue.put_nowait(msg)
        code = await proc.wait()
        if self._stopping:
            self.error = f"'{self.record.name.short}' (split across nodes) was unloaded"
        else:
            self.error = self._died(code)
            logger.error("%s", self.error)
        for call in self._calls.values():
            call.queue.put_nowait({"error": {"status": 503, "message": self.error}})

    def _died(self, code: int) -> str:
        tail = " | ".join(self._stderr[-3:])
        return (f"the process running '{self.record.name.short}' split across "
                f"{', '.join(p.node for p in self.parts)} ended (exit code {code}): a part's node or "
                f"its RPC server went away, or llama.cpp failed{': ' + tail if tail else ''}")

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._stderr = [*self._stderr[-STDERR_TAIL:], line]
                logger.debug("split worker: %s", line)

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for t in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(t, 2.0)
            t.cancel()


def _error(e: Any) -> OllamaDistributedError:
    if isinstance(e, dict):
        return from_status(int(e.get("status", 500)), str(e.get("message", "split model failed")))
    return EngineError(str(e))


# ---- the engine a node runs --------------------------------------------------------


class SplittingEngine:
    """The llamacpp engine, with models too large for this node split across
    peers (the module docstring). Everything else goes to `inner` unchanged."""

    def __init__(self, inner: Any, cfg: EngineSection, models_dir: Path, node_id: str,
                 peers: Callable[[str], list[Candidate]], open_tunnel: Callable[[str], int],
                 close_tunnel: Callable[[int], bool]) -> None:
        self.inner = inner
        self.cfg = cfg
        self.models_dir = models_dir
        self.node_id = node_id
        self._peers = peers
        self._open_tunnel = open_tunnel
        self._close_tunnel = close_tunnel
        self._split: dict[str, SplitModel] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._budget = local_budget_mib(cfg)  # the machine's memory does not change

    def __getattr__(self, name: str) -> Any:  # kind, continues, uses_store, cache, warm_prompts...
        return getattr(self.inner, name)

    @property
    def reaper(self) -> asyncio.Task[None] | None:
        return self._reaper

    async def start(self) -> None:
        # the inner engine's start only starts its reaper: this one runs its
        # passes too, so the node supervises one task
        self._reaper = asyncio.create_task(self._reap(), name="split-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for name in list(self._split):
            await self._drop(name)
        await self.inner.stop()

    async def _reap(self) -> None:
        """The inner engine's keep_alive pass, and the split models' own."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.inner.reap_once(time.time())
                for name, sm in list(self._split.items()):
                    if sm.expires_at is not None and sm.expires_at <= time.time() and not sm.lock.locked():
                        logger.info("unloading %s: keep_alive expired", name)
                        await self._drop(name)
            except Exception:  # one bad pass must not end the reaper
                logger.exception("keep-alive reaper pass failed")

    def plan(self, record: ModelRecord) -> list[Part] | None:
        """None when `record` fits this node; else the parts it splits into
        (InsufficientMemoryError when the cluster cannot hold it)."""
        need = need_mib(record)
        if need <= self._budget:  # fits here: no peer's advert is read
            return None
        local = Candidate(self.node_id, self._budget, True)
        chosen = choose(record.name.short, need, local, self._peers(record.name.short))
        if chosen is None:
            return None
        return shares(need, chosen, block_count(record))

    async def _split_model(self, req: InferenceRequest, record: ModelRecord) -> SplitModel | None:
        """The running split model for `record`, started if needed; None when
        it fits this node."""
        name = record.name.short
        sm = self._split.get(name)
        if sm is not None and sm.alive and sm.record.digest == record.digest:
            return sm
        if sm is None and need_mib(record) <= self._budget:
            return None  # the common case, on every request: no lock, no plan
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            sm = self._split.get(name)
            if sm is not None and sm.alive and sm.record.digest == record.digest:
                return sm
            if sm is not None:  # its child died or the model changed: plan afresh
                await self._drop(name)
            parts = self.plan(record)
            if parts is None:
                return None
            for p in parts:
                if not p.local:
                    p.port = self._open_tunnel(p.node)
            num_ctx = (req.options or {}).get("num_ctx") or record.parameters.get("num_ctx")
            sm = SplitModel(record, parts, int(num_ctx) if num_ctx else None, self.cfg, self.models_dir)
            try:
                await sm.start()
            except BaseException:
                self._close_tunnels(sm)
                raise
            self._split[name] = sm
            return sm

    def _close_tunnels(self, sm: SplitModel) -> None:
        for p in sm.parts:
            if p.port is not None:
                with contextlib.suppress(Exception):
                    self._close_tunnel(p.port)

    async def _drop(self, name: str) -> None:
        sm = self._split.pop(name, None)
        if sm is not None:
            await sm.stop()
            self._close_tunnels(sm)

    async def generate(self, req: InferenceRequest, record: ModelRecord | None, slot: int,
                       cancel: CancelToken) -> AsyncGenerator[dict[str, Any], None]:
        assert record is not None
        if record.name.short not in self._split and need_mib(record) <= self._budget:
            async for c in self.inner.generate(req, record, slot, cancel):
                yield c
            return
        sm = await self._split_model(req, record)
        if sm is None:
            async for c in self.inner.generate(req, record, slot, cancel):
                yield c
            return
        async with sm.lock:
            async for c in sm.generate(req, cancel):
                yield c

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float:
        assert record is not None
        if record.name.short not in self._split and need_mib(record) <= self._budget:
            took: float = await self.inner.load(req, record)
            return took
        sm = await self._split_model(req, record)
        if sm is None:
            took = await self.inner.load(req, record)
            return took
        return sm.load_duration

    async def embed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        assert record is not None
        if record.name.short in self._split or need_mib(record) > self._budget:
            raise NotAvailableError(f"embeddings from '{record.name.short}', a model split across nodes, "
                                    "are not supported")
        out: dict[str, Any] = await self.inner.embed(req, record)
        return out

    async def unload(self, model: str) -> None:
        if model in self._split:
            await self._drop(model)
        await self.inner.unload(model)

    def touch(self, model: str, keep_alive: float | None) -> None:
        sm = self._split.get(model)
        if sm is not None:
            sm.expires_at = None if keep_alive is None else time.time() + keep_alive
        self.inner.touch(model, keep_alive)

    def loaded(self) -> list[LoadedModel]:
        out: list[LoadedModel] = list(self.inner.loaded())
        for name, sm in self._split.items():
            if sm.alive:
                out.append(LoadedModel(name=name, digest=sm.record.digest, size=sm.record.size,
                                       expires_at=sm.expires_at, details=sm.record.details,
                                       context_length=sm.context_length,
                                       parts=[p.as_json() for p in sm.parts]))
        return out
