"""The default engine: llama.cpp in-process through llama-cpp-python.

One `Llama` per busy slot of a loaded model (weights are mmapped, so slots
share them), plus one embedding context per model when /api/embed is used.
Inference runs on worker threads; tokens cross to the event loop one call
each. A cancelled request stops at the next token and frees its slot.

Unloading never frees what is in use. Every way a model leaves memory
(keep_alive 0 / `ollama stop`, an expired keep_alive, an LRU eviction, a
delete, a replication trim, a tombstone from elsewhere) goes through
`unload()`, which takes the model out of service at once (new requests load a
fresh instance) and closes its llama.cpp contexts only when the last worker
thread using them has returned. Like Ollama, a generation under way when the
model is stopped runs to its end; it is not cut off. We chose this over
cancelling it because a client that asked for an answer gets it, and the
operator's intent (free the memory) is met as soon as it finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..config import EngineSection
from ..errors import BadRequestError, EngineError
from ..models import gguf_info
from ..models.store import ModelRecord
from . import options as opt
from .base import CancelToken, InferenceRequest, LoadedModel
from .prefixcache import PROMPT_TEXT_MAX, PromptCache, count_evals, pick_slot, prefix_ids
from .templates import Prompt, render_prompt
from .textstream import StopStream
from .toolcalls import OutputReader, call_grammar

logger = logging.getLogger(__name__)

# How often idle models are checked against their keep_alive deadline.
REAP_INTERVAL = 1.0
# llama.cpp makes contexts in multiples of this (it pads n_ctx up to one).
MIN_CTX = 256
# How long stop() waits for running generations to see their cancel token.
STOP_DRAIN_S = 10.0


@dataclass
class _Loaded:
    record: ModelRecord
    n_ctx: int
    slots: dict[int, Any] = field(default_factory=dict)  # slot index -> Llama
    embedder: Any = None
    expires_at: float | None = None
    load_duration: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # requests holding this instance: its contexts stay open while > 0
    draining: bool = False  # out of service: closed when `users` reaches 0
    busy: set[int] = field(default_factory=set)  # slots a request holds (the others' contexts may be swapped)
    texts: dict[int, str] = field(default_factory=dict)  # id(Llama) -> the prompt its KV holds
    guard: threading.Lock = field(default_factory=threading.Lock)  # slots, busy, texts: loop and threads


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
    continues = True

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
        self._draining: list[_Loaded] = []  # unloaded, closed once their last user returns
        self._train_ctx: dict[str, int] = {}  # model digest -> trained context length
        self._abandoned: list[Any] = []  # contexts left broken by llama.cpp: kept, never freed
        self._pool = ThreadPoolExecutor(
            max_workers=max(4, cfg.num_parallel * cfg.max_loaded_models + 2),
            thread_name_prefix="llama",
        )
        self.reaper: asyncio.Task[None] | None = None  # supervised by the node
        self._threads = cfg.threads or (os.cpu_count() or 1)
        self.cache = PromptCache(cfg.prompt_cache_mib << 20)  # warm prefixes, every model within one budget
        # extra llama.cpp model parameters (a split model's worker: n_gpu_layers, tensor_split)
        self.load_kwargs: dict[str, Any] = {}

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.reaper = asyncio.create_task(self._reap(), name="llamacpp-reaper")

    async def stop(self) -> None:
        if self.reaper:
            self.reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reaper
        for name in list(self._models):
            await self.unload(name)
        # Requests were cancelled with the HTTP server; their threads return at
        # their next token. Whatever is still running after this is left open
        # (the process is exiting) rather than freed under a running thread.
        deadline = time.monotonic() + STOP_DRAIN_S
        while self._draining and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._draining:
            logger.warning("stopping with %d model instance(s) still in use", len(self._draining))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def configure(self, num_parallel: int, max_loaded_models: int) -> None:
        self.cfg.num_parallel = num_parallel
        self.cfg.max_loaded_models = max_loaded_models

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                await self.reap_once(time.time())
            except Exception:  # one bad pass must not end the reaper
                logger.exception("keep-alive reaper pass failed; retrying in %.0fs", REAP_INTERVAL)

    async def reap_once(self, now: float) -> None:
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
            **self.load_kwargs,
        )
        if embedding:
            # a whole input in one batch: llama-cpp-python refuses (or truncates) an
            # input longer than n_batch, whose default is only min(n_ctx, 512)
            kwargs.update(embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          n_batch=n_ctx, n_ubatch=n_ctx)
        try:
            return llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"failed to load model '{record.name.short}': {e}") from e

    async def _trained_ctx(self, record: ModelRecord) -> int:
        """The context the model was trained with (GGUF metadata), 0 when unknown."""
        if record.digest not in self._train_ctx and record.model_path is not None:
            try:
                info = await asyncio.to_thread(gguf_info.read, record.model_path)
                self._train_ctx[record.digest] = int(info.get("context_length") or 0)
            except (OSError, ValueError, TypeError):
                self._train_ctx[record.digest] = 0
        return self._train_ctx.get(record.digest, 0)

    async def _ensure_loaded(self, record: ModelRecord, n_ctx: int | None) -> _Loaded:
        name = record.name.short
        want_ctx = n_ctx or self.cfg.num_ctx
        trained = await self._trained_ctx(record)
        # llama.cpp pads a context to a multiple of MIN_CTX, and an embedding
        # context whose n_ctx is not one aborts the process (GGML_ASSERT)
        want_ctx = -(-max(want_ctx, 1) // MIN_CTX) * MIN_CTX
        if trained and want_ctx > trained:
            # as Ollama: a context larger than the model was trained for is cut to it
            # (llama.cpp would try to allocate it, for minutes, and fail)
            cut = max(MIN_CTX, trained // MIN_CTX * MIN_CTX)
            logger.warning("num_ctx %d is more than %s was trained for; using %d", want_ctx, name, cut)
            want_ctx = cut
        n_ctx = want_ctx  # a request without num_ctx wants the default: as Ollama, options decide
        lm = self._models.get(name)
        if lm is not None and lm.record.digest != record.digest:
            await self.unload(name)  # replaced by a new create under the same name
            lm = None
        if lm is not None and n_ctx and lm.n_ctx != n_ctx:
            # another context size: a fresh instance, as Ollama reloads; requests
            # on the old one finish there first (unload drains)
            await self.unload(name)
            lm = None
        if lm is None:
            victim = self._evict_candidate(list(self._models), self.cfg.max_loaded_models)
            if victim is not None:
                logger.info("unloading %s to make room for %s", victim, name)
                await self.unload(victim)
            lm = _Loaded(record=record, n_ctx=want_ctx)
            self._models[name] = lm
        lm.users += 1  # no await since the lookup: an unload cannot slip in between
        return lm

    def _release(self, lm: _Loaded) -> None:
        """One user of `lm` is done (its worker thread has returned)."""
        lm.users -= 1
        if lm.draining and lm.users <= 0:
            self._close(lm)

    def _release_when_done(self, lm: _Loaded, fut: asyncio.Future[Any] | None) -> None:
        """Release `lm` once `fut` (a worker thread's run) has finished, not before:
        a cancelled coroutine must not free contexts a thread still uses."""
        if fut is None or fut.done():
            self._release(lm)
        else:
            fut.add_done_callback(lambda _f: self._release(lm))

    def _abandon_slot(self, lm: _Loaded, llama: Any) -> None:
        """A context llama.cpp failed on is neither reused nor freed (freeing one
        after a failed decode crashed the process): the slot loads afresh."""
        with lm.guard:
            for slot, held in list(lm.slots.items()):
                if held is llama:
                    del lm.slots[slot]
            lm.texts.pop(id(llama), None)
        self._abandoned.append(llama)

    def _close(self, lm: _Loaded) -> None:
        if lm in self._draining:
            self._draining.remove(lm)
        for llama in [*lm.slots.values(), lm.embedder]:
            if llama is not None:
                with contextlib.suppress(Exception):
                    llama.close()
        with lm.guard:
            lm.slots.clear()
            lm.texts.clear()
        lm.embedder = None
        self.cache.drop(lm)  # its states fit only its contexts
        logger.info("unloaded %s", lm.record.name.short)

    async def _slot_llama(self, lm: _Loaded, slot: int) -> tuple[Any, float]:
        """The Llama for `slot`, created on first use; returns it and its load seconds."""
        if slot in lm.slots:
            return lm.slots[slot], 0.0
        async with lm.lock:
            if slot in lm.slots:
                return lm.slots[slot], 0.0
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                llama = await loop.run_in_executor(self._pool, self._new_llama, lm.record, lm.n_ctx, False)
            except EngineError:
                # nothing loaded: the next request starts afresh instead of meeting this failure again
                if not lm.slots and lm.embedder is None and self._models.get(lm.record.name.short) is lm:
                    self._models.pop(lm.record.name.short)
                raise
            took = time.perf_counter() - t0
            with lm.guard:
                lm.slots[slot] = llama
            lm.load_duration = took
            logger.info("loaded %s slot %d in %.2fs (n_ctx=%d)", lm.record.name.short, slot, took, lm.n_ctx)
            return llama, took

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float:
        assert record is not None
        opts = opt.normalise(req.options, record.parameters)
        lm = await self._ensure_loaded(record, opts.get("num_ctx") or None)
        try:
            _, took = await self._slot_llama(lm, 0)
        finally:
            self._release(lm)  # the load ran on a worker thread that has returned
        return took

    async def unload(self, model: str) -> None:
        """Take `model` out of service now; close it once no request uses it."""
        lm = self._models.pop(model, None)
        if lm is None:
            return
        lm.draining = True
        if lm.users <= 0:
            self._close(lm)
            return
        self._draining.append(lm)
        logger.info("unloading %s once its %d running request(s) finish", model, lm.users)

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
        fut: asyncio.Future[None] | None = None
        with lm.guard:
            lm.busy.add(slot)  # its context is this request's until the worker thread returns
        try:
            llama, load_s = await self._slot_llama(lm, slot)
            async with contextlib.aclosing(self._stream(llama, lm, slot, req, opts, cancel, t_start,
                                                        load_s)) as it:
                async for chunk in it:
                    if isinstance(chunk, asyncio.Future):
                        fut = chunk
                        continue
                    yield chunk
        finally:
            def free(_f: Any = None) -> None:
                with lm.guard:
                    lm.busy.discard(slot)

            if fut is None or fut.done():
                free()
            else:
                fut.add_done_callback(free)
            self._release_when_done(lm, fut)

    async def _stream(self, llama: Any, lm: _Loaded, slot: int, req: InferenceRequest, opts: dict[str, Any],
                      cancel: CancelToken, t_start: float, load_s: float) -> AsyncGenerator[Any, None]:
        """Run the generation on a worker thread; yields its future first, then chunks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                self._generate_blocking(llama, lm, slot, req, opts, cancel, emit)
            except BadRequestError as e:  # the client's mistake (a 400), not the engine's
                logger.debug("refused a request for %s: %s", req.model, e)
                emit(e)
            except BaseException as e:  # crosses to the event loop as an error chunk
                logger.exception("generation failed for %s", req.model)
                if isinstance(e, RuntimeError):  # llama.cpp failed: set this context aside (see _embed)
                    # the slot's context now: _warm may have swapped in another idle one
                    loop.call_soon_threadsafe(self._abandon_slot, lm, lm.slots.get(slot, llama))
                emit(e if isinstance(e, EngineError) else EngineError(f"generation failed: {e}"))

        fut = loop.run_in_executor(self._pool, run)
        try:
            yield fut
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
        slot: int,
        req: InferenceRequest,
        opts: dict[str, Any],
        cancel: CancelToken,
        emit: Callable[[Any], None],
    ) -> None:
        llama_cpp = _import_llama()
        t0 = time.perf_counter()
        tokens: list[int] = list(req.context or [])
        n_vocab = llama.n_vocab()
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:  # llama.cpp would abort the process on it
            raise BadRequestError(f"context holds token id {bad}, outside this model's vocabulary "
                                  f"(0-{n_vocab - 1}); send back the context this model returned")
        resumed = list(req.continuation)  # a migrated stream: what another node already generated
        bad = next((t for t in resumed if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise BadRequestError(f"continuation holds token id {bad}, outside this model's vocabulary")
        fim = _fill_in_middle(llama_cpp, llama, lm.record, req) if req.suffix else None
        if fim is not None:  # the vocabulary's FIM tokens, as llama.cpp's /infill (no template)
            prompt = Prompt("", [], False)
            tokens = fim
        else:
            prompt = render_prompt(llama, lm.record, req)
            tokens += llama.tokenize(prompt.text.encode("utf-8"), add_bos=prompt.add_bos and not tokens, special=True)
        tokens += resumed  # raw continuation: no template re-render, the same token ids
        if not tokens:
            raise BadRequestError("the prompt is empty once rendered (raw with no prompt?): nothing to generate from")
        n_ctx = llama.n_ctx()
        num_predict = int(opt.get(opts, "num_predict"))
        if len(tokens) >= n_ctx and not req.truncate:
            raise BadRequestError("the input length exceeds the context length")  # Ollama's words
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
        if seed < 0 and not resumed:
            llama = self._warm(lm, slot, llama, tokens)
        if seed >= 0:
            llama.set_seed(seed)
            # Reusing a cached prefix evaluates the prompt in different batches,
            # which can shift a greedy choice; a seeded request must repeat exactly.
            llama.reset()
        else:
            llama.set_seed(int.from_bytes(os.urandom(4), "little"))
        stream = StopStream(list(opts.get("stop", [])) + prompt.stops)
        for token in resumed:
            # The client has this text already: replay it only to put the stop
            # sequence and UTF-8 state where the other node left it.
            stream.feed(llama.detokenize([token]))
        vocab = llama._model.vocab
        generated: list[int] = []
        unsent: list[int] = []  # ids fed since the last text chunk: carried on the next one
        pending_lp: list[dict[str, Any]] = []  # tokens whose text the stop-sequence stream still holds
        first_at: float | None = None
        done_reason = "stop"
        budget = num_predict if num_predict > 0 else n_ctx
        if num_predict == 0:
            budget = 0
        if cancel.cancelled:
            self._keep(lm, llama, "", copy=False)  # _warm may have changed what it holds: unknown now
            return
        start: Callable[[list[int]], Iterator[int]] = functools.partial(
            llama.generate,
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
        )
        evaluated = count_evals(llama)  # prompt_eval_count: what was evaluated, not what was sent
        prompt_evaluated = 0
        if resumed and budget > 0:
            _replay(llama, tokens, len(resumed), exact=float(opt.get(opts, "temperature")) == 0 or seed >= 0)
        if budget <= 0:
            gen: Iterator[int] = iter(())
        elif req.shift:
            gen = _shifting(start, tokens, n_ctx, max(0, int(opt.get(opts, "num_keep"))))
        else:
            gen = start(tokens)
        if resumed:
            _remember(llama, resumed)
        try:
            for token in gen:
                if first_at is None:
                    first_at = time.perf_counter()
                    prompt_evaluated = evaluated[0]
                if cancel.cancelled:
                    done_reason = "cancel"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                generated.append(token)
                unsent.append(token)
                if req.logprobs:
                    pending_lp.append(_logprob(llama_cpp, llama, token, req.top_logprobs))
                text = stream.feed(llama.detokenize([token]))
                if text:
                    for chunk in reader.feed(text):
                        if unsent:  # the ids this text came from, for a migration (dispatch.Progress)
                            chunk["tokens"], unsent = unsent, []
                        emit(_with_logprobs(chunk, pending_lp) if "text" in chunk else chunk)
                if stream.stopped:
                    break
                if len(generated) >= budget:
                    done_reason = "length"
                    break
                if len(tokens) + len(generated) >= n_ctx and not req.shift:
                    done_reason = "length"  # the window is full and shifting it is off
                    break
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()
            llama.__dict__.pop("_init_sampler", None)  # undo _remember
            llama.__dict__.pop("eval", None)  # undo count_evals
        if done_reason == "cancel":
            self._keep(lm, llama, prompt.text, copy=False)  # the client left: free the slot now
            return
        tail = stream.flush()
        for chunk in [*reader.feed(tail), *reader.finish()] if tail else reader.finish():
            if unsent:
                chunk["tokens"], unsent = unsent, []
            emit(_with_logprobs(chunk, pending_lp) if "text" in chunk else chunk)
        if pending_lp or unsent:  # tokens whose text became a tool call or thinking: still reported
            emit(_with_logprobs({"text": "", "tokens": unsent}, pending_lp))
        end = time.perf_counter()
        first = first_at or end
        proper = max(0, len(tokens) - len(resumed))  # the prompt proper; a continuation's ids are not
        prompt_evaluated = min(proper, max(0, prompt_evaluated - len(resumed)))
        emit(
            {
                "done": True,
                "done_reason": done_reason,
                "prompt_eval_count": prompt_evaluated,
                # the rest of the prompt's KV came from the slot's context or a kept state
                "prompt_cached_count": proper - prompt_evaluated if first_at is not None else 0,
                "prompt_eval_duration": int((first - t0) * 1e9),
                "eval_count": len(generated),
                "eval_duration": int((end - first) * 1e9),
                "context": tokens + generated,
            }
        )
        self._keep(lm, llama, prompt.text)

    def _warm(self, lm: _Loaded, slot: int, llama: Any, tokens: list[int]) -> Any:
        """The context to run `tokens` on, its KV made the longest prefix of
        them this node has: the idle context sharing the longest prefix
        (swapped into this request's slot), then a kept state if one shares
        more (prefixcache). Returns the context; `generate` then evaluates
        only what follows the common prefix."""
        ids = prefix_ids(tokens)
        with lm.guard:
            if len(lm.slots) > 1 and lm.slots.get(slot) is llama:
                best = pick_slot(lm.slots, set(lm.slots) - lm.busy, slot, ids)
                if best != slot:
                    lm.slots[slot], lm.slots[best] = lm.slots[best], lm.slots[slot]
                    llama = lm.slots[slot]
        self.cache.restore_best(lm, llama, ids)
        return llama

    def _keep(self, lm: _Loaded, llama: Any, text: str, copy: bool = True) -> None:
        """After an answer: note what the context holds, and keep a copy of it
        (the client has its answer already; the slot stays taken until this returns)."""
        with lm.guard:
            lm.texts[id(llama)] = text[:PROMPT_TEXT_MAX]
        if lm.draining or not copy:
            return  # a draining instance's states are dropped with it
        try:
            self.cache.keep(lm, lm.record.name.short, llama, text)
        except (RuntimeError, MemoryError) as e:  # the answer is out: only the copy is lost
            logger.warning("could not keep the prompt state of %s: %s", lm.record.name.short, e)

    def warm_prompts(self) -> dict[str, list[str]]:
        """Model name -> the rendered prompts whose KV this node holds now: kept
        states (most recently used first), then what the slots' contexts hold."""
        out = self.cache.prompts(self._models)
        for name, lm in self._models.items():
            with lm.guard:
                live = [lm.texts[id(llama)] for llama in lm.slots.values() if id(llama) in lm.texts]
            have = out.setdefault(name, [])
            have.extend(text for text in live if text and text not in have)
            if not have:
                del out[name]
        return out

    async def embed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        assert record is not None
        t0 = time.perf_counter()
        opts = opt.normalise(req.options, record.parameters)
        lm = await self._ensure_loaded(record, opts.get("num_ctx") or None)
        threads: list[asyncio.Future[Any]] = []
        try:
            return await self._embed(lm, req, t0, threads)
        finally:
            self._release_when_done(lm, threads[-1] if threads else None)

    async def _embed(self, lm: _Loaded, req: InferenceRequest, t0: float,
                     threads: list[asyncio.Future[Any]]) -> dict[str, Any]:
        load_s = 0.0
        loop = asyncio.get_running_loop()

        def on_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            fut = loop.run_in_executor(self._pool, fn, *args)
            threads.append(fut)  # the caller releases `lm` only once this has returned
            return fut

        async with lm.lock:
            if lm.embedder is None:
                t = time.perf_counter()
                lm.embedder = await on_thread(self._new_llama, lm.record, lm.n_ctx, True)
                load_s = time.perf_counter() - t
        embedder = lm.embedder

        def run() -> tuple[list[list[float]], int]:
            n_ctx = min(embedder.n_ctx(), embedder.n_batch)
            count = 0
            for i, text in enumerate(req.input):
                if not embedder.tokenize(text.encode("utf-8")):  # as embed() will tokenize it
                    # an empty batch makes llama_decode fail and leaves the context unsafe to free
                    raise BadRequestError(f"input[{i}] has no tokens: there is nothing to embed")
                n = len(embedder.tokenize(text.encode("utf-8"), add_bos=True, special=True))
                if n > n_ctx and not req.truncate:
                    raise BadRequestError(
                        f"input length {n} exceeds maximum context length {n_ctx}"
                    )
                count += min(n, n_ctx)
            vectors = embedder.embed(req.input, normalize=req.normalize, truncate=req.truncate)
            return [list(map(float, v)) for v in vectors], count

        async with lm.lock:  # one embedding context per model: one batch at a time
            try:
                vectors, count = await on_thread(run)
            except RuntimeError as e:
                # llama.cpp failed mid-batch: that context is not used again, and not freed
                # either (freeing it after a failed decode crashed the process)
                self._abandoned.append(embedder)
                if lm.embedder is embedder:
                    lm.embedder = None
                logger.error("embedding failed for %s: %s; its context is set aside", req.model, e)
                raise EngineError(f"embedding failed: {e}") from e
        return {
            "embeddings": vectors,
            "prompt_eval_count": count,
            "load_duration": int(load_s * 1e9),
            "total_duration": int((time.perf_counter() - t0) * 1e9),
        }


def _replay(llama: Any, tokens: list[int], resumed: int, exact: bool) -> None:
    """Evaluate a continuation's context as the node that began it did: the
    prompt in one batch, then (`exact`: a greedy or seeded request, whose
    client may expect the very same text) each generated token alone, as it
    was fed back after its sampling. Batching them instead is faster but
    rounds differently and can tip a close greedy choice. `generate` then
    finds the whole context cached and samples from these logits."""
    prompt = len(tokens) - resumed
    if prompt <= 0:
        return  # truncated into the generated part: generate evaluates it all
    llama.reset()
    llama.eval(tokens[:prompt])
    if exact:
        for token in tokens[prompt:]:
            llama.eval([token])
    else:
        llama.eval(tokens[prompt:])


def _remember(llama: Any, history: list[int]) -> None:
    """Give the sampler `generate` builds the penalty history the first
    node's had: llama.cpp's repeat penalties count the tokens the sampler
    accepted (the last 64 it sampled), and a fresh sampler has none, so a
    continuation would otherwise choose differently. Undone by deleting the
    instance attribute once the generation ends."""
    make = type(llama)._init_sampler

    def init_sampler(*args: Any, **kwargs: Any) -> Any:
        sampler = make(llama, *args, **kwargs)
        for token in history:
            sampler.accept(token)
        return sampler

    llama._init_sampler = init_sampler


def _shifting(start: Callable[[list[int]], Iterator[int]], tokens: list[int], n_ctx: int,
              keep: int) -> Iterator[int]:
    """Generate past a full context window, as Ollama's `shift` does: drop the
    older half of what follows the first `keep` tokens and go on (llama.cpp
    re-evaluates the kept tail; the KV cache keeps the shared prefix)."""
    window = list(tokens)
    while True:
        gen = start(window)
        try:
            for token in gen:
                yield token
                window.append(token)
                if len(window) >= n_ctx:
                    break
            else:
                return
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()
        keep = min(keep, len(window) - 1)
        discard = max(1, (len(window) - keep) // 2)
        logger.debug("context window full (%d tokens): shifting out %d", len(window), discard)
        window = window[:keep] + window[keep + discard:]


def _fill_in_middle(llama_cpp: Any, llama: Any, record: ModelRecord, req: InferenceRequest) -> list[int] | None:
    """The prompt tokens of a fill-in-the-middle request, as llama.cpp's
    /infill builds them from the vocabulary's FIM tokens: [BOS] <fim_pre>
    prompt <fim_suf> suffix <fim_mid>. None when the model's template takes
    the suffix itself (an Ollama template with `.Suffix`); a model with
    neither does not support insert, in Ollama's words."""
    if "Suffix" in (req.template or record.template or ""):
        return None
    vocab = llama._model.vocab
    ids = []
    for name in ("llama_vocab_fim_pre", "llama_vocab_fim_suf", "llama_vocab_fim_mid"):
        fn = getattr(llama_cpp, name, None)
        ids.append(int(fn(vocab)) if fn is not None else -1)
    if min(ids) < 0:
        raise BadRequestError(f"{record.name.short} does not support insert")
    pre, suf, mid = ids
    text = [pre, *llama.tokenize(req.prompt.encode("utf-8"), add_bos=False, special=False),
            suf, *llama.tokenize(req.suffix.encode("utf-8"), add_bos=False, special=False), mid]
    if llama_cpp.llama_vocab_get_add_bos(vocab):
        text.insert(0, llama.token_bos())
    return text


def _logprob(llama_cpp: Any, llama: Any, token: int, top: int) -> dict[str, Any]:
    """The sampled token's log probability, and the `top` likeliest, from the
    raw logits it was sampled from (before temperature and penalties, as Ollama
    and OpenAI report them). Right after `generate` yields a token those logits
    are still the context's last output row."""
    import numpy as np

    n_vocab = llama.n_vocab()
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1), shape=(n_vocab,))
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak).sum()))

    def entry(t: int) -> dict[str, Any]:
        piece = llama.detokenize([t])
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": float(logits[t]) - log_z,
                "bytes": list(piece)}

    out = entry(token)
    if top > 0:
        top = min(top, n_vocab)
        best = np.argpartition(-logits, top - 1)[:top]
        out["top_logprobs"] = [entry(int(t)) for t in best[np.argsort(-logits[best], kind="stable")]]
    return out


def _with_logprobs(chunk: dict[str, Any], pending: list[dict[str, Any]]) -> dict[str, Any]:
    """Attach the logprobs of the tokens this text came from (and forget them)."""
    if pending:
        chunk["logprobs"] = list(pending)
        pending.clear()
    return chunk


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
