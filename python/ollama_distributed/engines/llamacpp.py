"""The default engine: llama.cpp in-process through llama-cpp-python.

One `Llama` per busy slot of a loaded model (weights are mmapped, so slots
share them), plus one embedding context per model when /api/embed is used.
Inference runs on worker threads; tokens cross to the event loop one call
each. A cancelled request stops at the next token and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..config import EngineSection
from ..errors import BadRequestError, EngineError
from ..models.store import ModelRecord
from . import options as opt
from .base import CancelToken, InferenceRequest, LoadedModel
from .templates import render_prompt
from .textstream import StopStream
from .toolcalls import OutputReader, call_grammar

logger = logging.getLogger(__name__)

# How often idle models are checked against their keep_alive deadline.
REAP_INTERVAL = 1.0


@dataclass
class _Loaded:
    record: ModelRecord
    n_ctx: int
    slots: dict[int, Any] = field(default_factory=dict)  # slot index -> Llama
    embedder: Any = None
    expires_at: float | None = None
    load_duration: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _import_llama() -> Any:
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EngineError(
            f"the llamacpp engine needs llama-cpp-python: {e}; "
            "install it with `pip install llama-cpp-python` or run `make dev`"
        ) from e
    return llama_cpp


class LlamaCppEngine:
    kind = "llamacpp"
    uses_store = True

    def __init__(
        self,
        cfg: EngineSection,
        evict_candidate: Callable[[list[str], int], str | None],
        is_idle: Callable[[str], bool],
    ) -> None:
        self.cfg = cfg
        self._evict_candidate = evict_candidate
        self._is_idle = is_idle
        self._models: dict[str, _Loaded] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(4, cfg.num_parallel * cfg.max_loaded_models + 2),
            thread_name_prefix="llama",
        )
        self._reaper: asyncio.Task[None] | None = None
        self._threads = cfg.threads or (os.cpu_count() or 1)

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="llamacpp-reaper")

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for name in list(self._models):
            await self.unload(name)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def configure(self, num_parallel: int, max_loaded_models: int) -> None:
        self.cfg.num_parallel = num_parallel
        self.cfg.max_loaded_models = max_loaded_models

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.time()
            for name, lm in list(self._models.items()):
                if lm.expires_at is not None and lm.expires_at <= now and self._is_idle(name):
                    logger.info("unloading %s: keep_alive expired", name)
                    await self.unload(name)

    # ---- loading -------------------------------------------------------------

    def _new_llama(self, record: ModelRecord, n_ctx: int, embedding: bool) -> Any:
        llama_cpp = _import_llama()
        if record.model_path is None or not record.model_path.is_file():
            raise EngineError(f"model '{record.name.short}' has no model file in the store")
        kwargs: dict[str, Any] = dict(
            model_path=str(record.model_path),
            n_ctx=n_ctx,
            n_threads=self._threads,
            n_threads_batch=self._threads,
            verbose=False,
        )
        if embedding:
            kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        try:
            return llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"failed to load model '{record.name.short}': {e}") from e

    async def _ensure_loaded(self, record: ModelRecord, n_ctx: int | None) -> _Loaded:
        name = record.name.short
        want_ctx = n_ctx or self.cfg.num_ctx
        lm = self._models.get(name)
        if lm is not None and lm.record.digest != record.digest and self._is_idle(name):
            await self.unload(name)  # replaced by a new create under the same name
            lm = None
        if lm is not None and n_ctx and lm.n_ctx != n_ctx and self._is_idle(name):
            await self.unload(name)
            lm = None
        if lm is None:
            victim = self._evict_candidate(list(self._models), self.cfg.max_loaded_models)
            if victim is not None:
                logger.info("unloading %s to make room for %s", victim, name)
                await self.unload(victim)
            lm = _Loaded(record=record, n_ctx=want_ctx)
            self._models[name] = lm
        return lm

    async def _slot_llama(self, lm: _Loaded, slot: int) -> tuple[Any, float]:
        """The Llama for `slot`, created on first use; returns it and its load seconds."""
        if slot in lm.slots:
            return lm.slots[slot], 0.0
        async with lm.lock:
            if slot in lm.slots:
                return lm.slots[slot], 0.0
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            llama = await loop.run_in_executor(self._pool, self._new_llama, lm.record, lm.n_ctx, False)
            took = time.perf_counter() - t0
            lm.slots[slot] = llama
            lm.load_duration = took
            logger.info("loaded %s slot %d in %.2fs (n_ctx=%d)", lm.record.name.short, slot, took, lm.n_ctx)
            return llama, took

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float:
        assert record is not None
        opts = opt.normalise(req.options, record.parameters)
        lm = await self._ensure_loaded(record, opts.get("num_ctx") or None)
        _, took = await self._slot_llama(lm, 0)
        return took

    async def unload(self, model: str) -> None:
        lm = self._models.pop(model, None)
        if lm is None:
            return
        for llama in [*lm.slots.values(), lm.embedder]:
            if llama is not None:
                with contextlib.suppress(Exception):
                    llama.close()
        logger.info("unloaded %s", model)

    def touch(self, model: str, keep_alive: float | None) -> None:
        lm = self._models.get(model)
        if lm is not None:
            lm.expires_at = None if keep_alive is None else time.time() + keep_alive

    def loaded(self) -> list[LoadedModel]:
        return [
            LoadedModel(
                name=name,
                digest=lm.record.digest,
                size=lm.record.size,
                expires_at=lm.expires_at,
                details=lm.record.details,
                context_length=lm.n_ctx,
            )
            for name, lm in self._models.items()
        ]

    async def list_models(self) -> list[dict[str, Any]]:
        return []  # served from the store

    # ---- inference -------------------------------------------------------------

    async def generate(
        self, req: InferenceRequest, record: ModelRecord | None, slot: int, cancel: CancelToken
    ) -> AsyncGenerator[dict[str, Any], None]:
        assert record is not None
        t_start = time.perf_counter()
        opts = opt.normalise(req.options, record.parameters)
        lm = await self._ensure_loaded(record, opts.get("num_ctx") or None)
        llama, load_s = await self._slot_llama(lm, slot)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                self._generate_blocking(llama, lm, req, opts, cancel, emit)
            except BadRequestError as e:  # the client's mistake (a 400), not the engine's
                logger.debug("refused a request for %s: %s", req.model, e)
                emit(e)
            except BaseException as e:  # crosses to the event loop as an error chunk
                logger.exception("generation failed for %s", req.model)
                emit(e if isinstance(e, (BadRequestError, EngineError))
                     else EngineError(f"generation failed: {e}"))

        fut = loop.run_in_executor(self._pool, run)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.get("done"):
                    item["load_duration"] = int(load_s * 1e9)
                    item["total_duration"] = int((time.perf_counter() - t_start) * 1e9)
                    yield item
                    break
                yield item
        finally:
            cancel.cancel()
            # The worker returns at its next token; wait so the slot is really free.
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)

    def _generate_blocking(
        self,
        llama: Any,
        lm: _Loaded,
        req: InferenceRequest,
        opts: dict[str, Any],
        cancel: CancelToken,
        emit: Callable[[Any], None],
    ) -> None:
        llama_cpp = _import_llama()
        t0 = time.perf_counter()
        prompt = render_prompt(llama, lm.record, req)
        tokens: list[int] = list(req.context or [])
        tokens += llama.tokenize(prompt.text.encode("utf-8"), add_bos=prompt.add_bos and not tokens, special=True)
        n_ctx = llama.n_ctx()
        num_predict = int(opt.get(opts, "num_predict"))
        if len(tokens) >= n_ctx:
            keep = max(1, n_ctx - max(num_predict, 0) - 1 if num_predict > 0 else n_ctx // 2)
            logger.warning("prompt of %d tokens truncated to the last %d (num_ctx %d)", len(tokens), keep, n_ctx)
            tokens = tokens[-keep:]
        grammar = None
        tools = req.tools if prompt.tool_tag else None
        if tools and (req.tool_choice == "required" or isinstance(req.tool_choice, dict)):
            # a call is due: decode only what parses as one, so even a tiny model makes a valid call
            from llama_cpp.llama_grammar import LlamaGrammar

            grammar = LlamaGrammar.from_string(
                call_grammar(tools, req.tool_choice, prompt.tool_tag or "{", prompt.tool_style), verbose=False)
        elif req.format:
            grammar = _grammar(llama_cpp, req.format)
        reader = OutputReader(prompt.think_tags, prompt.thinking_open, prompt.tool_tag, tools)
        seed = int(opt.get(opts, "seed"))
        if seed >= 0:
            llama.set_seed(seed)
            # Reusing a cached prefix evaluates the prompt in different batches,
            # which can shift a greedy choice; a seeded request must repeat exactly.
            llama.reset()
        else:
            llama.set_seed(int.from_bytes(os.urandom(4), "little"))
        stream = StopStream(list(opts.get("stop", [])) + prompt.stops)
        vocab = llama._model.vocab
        generated: list[int] = []
        first_at: float | None = None
        done_reason = "stop"
        budget = num_predict if num_predict > 0 else n_ctx
        if num_predict == 0:
            budget = 0
        if cancel.cancelled:
            return
        gen = llama.generate(
            tokens,
            top_k=int(opt.get(opts, "top_k")),
            top_p=float(opt.get(opts, "top_p")),
            min_p=float(opt.get(opts, "min_p")),
            typical_p=float(opt.get(opts, "typical_p")),
            temp=float(opt.get(opts, "temperature")),
            repeat_penalty=float(opt.get(opts, "repeat_penalty")),
            presence_penalty=float(opt.get(opts, "presence_penalty")),
            frequency_penalty=float(opt.get(opts, "frequency_penalty")),
            tfs_z=float(opt.get(opts, "tfs_z")),
            mirostat_mode=int(opt.get(opts, "mirostat")),
            mirostat_tau=float(opt.get(opts, "mirostat_tau")),
            mirostat_eta=float(opt.get(opts, "mirostat_eta")),
            penalize_nl=bool(opt.get(opts, "penalize_newline")),
            grammar=grammar,
        ) if budget > 0 else iter(())
        try:
            for token in gen:
                if first_at is None:
                    first_at = time.perf_counter()
                if cancel.cancelled:
                    done_reason = "cancel"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                generated.append(token)
                text = stream.feed(llama.detokenize([token]))
                if text:
                    for chunk in reader.feed(text):
                        emit(chunk)
                if stream.stopped:
                    break
                if len(generated) >= budget:
                    done_reason = "length"
                    break
                if len(tokens) + len(generated) >= n_ctx:
                    done_reason = "length"
                    break
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()
        if done_reason == "cancel":
            return
        tail = stream.flush()
        for chunk in [*reader.feed(tail), *reader.finish()] if tail else reader.finish():
            emit(chunk)
        end = time.perf_counter()
        first = first_at or end
        emit(
            {
                "done": True,
                "done_reason": done_reason,
                "prompt_eval_count": len(tokens),
                "prompt_eval_duration": int((first - t0) * 1e9),
                "eval_count": len(generated),
                "eval_duration": int((end - first) * 1e9),
                "context": tokens + generated,
            }
        )

    async def embed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        assert record is not None
        t0 = time.perf_counter()
        opts = opt.normalise(req.options, record.parameters)
        lm = await self._ensure_loaded(record, opts.get("num_ctx") or None)
        load_s = 0.0
        loop = asyncio.get_running_loop()
        async with lm.lock:
            if lm.embedder is None:
                t = time.perf_counter()
                lm.embedder = await loop.run_in_executor(self._pool, self._new_llama, lm.record, lm.n_ctx, True)
                load_s = time.perf_counter() - t
        embedder = lm.embedder

        def run() -> tuple[list[list[float]], int]:
            n_ctx = embedder.n_ctx()
            count = 0
            for text in req.input:
                n = len(embedder.tokenize(text.encode("utf-8"), add_bos=True, special=True))
                if n > n_ctx and not req.truncate:
                    raise BadRequestError(
                        f"input length {n} exceeds maximum context length {n_ctx}"
                    )
                count += min(n, n_ctx)
            vectors = embedder.embed(req.input, normalize=req.normalize, truncate=req.truncate)
            return [list(map(float, v)) for v in vectors], count

        async with lm.lock:  # one embedding context per model: one batch at a time
            vectors, count = await loop.run_in_executor(self._pool, run)
        return {
            "embeddings": vectors,
            "prompt_eval_count": count,
            "load_duration": int(load_s * 1e9),
            "total_duration": int((time.perf_counter() - t0) * 1e9),
        }


def _grammar(llama_cpp: Any, fmt: Any) -> Any:
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if fmt == "json":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    if isinstance(fmt, dict):
        try:
            return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
        except Exception as e:
            raise BadRequestError(f"invalid JSON schema in format: {e}") from e
    raise BadRequestError('format must be "json" or a JSON schema object')
