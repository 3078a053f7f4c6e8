"""A synthetic engine for load-testing the cluster layer: configurable time to
first token and token rate, deterministic words. Never a default: it exists so
relay overhead can be measured without the model's own cost in the way.

It also stands in for a capable model where the APIs' translation is what a
test checks: it answers `think` with a thinking chunk, `logprobs` with made-up
but well-formed log probabilities, and `tools` (unless `tool_choice` is
"none", or the last message is already a tool's result) with one call of the
first tool, or the one `tool_choice` names, its required arguments filled in."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import time
from collections.abc import AsyncGenerator
from typing import Any

from ..config import EngineSection
from ..errors import EngineError
from ..models.store import ModelRecord
from . import options as opt
from .base import CancelToken, InferenceRequest, LoadedModel
from .prefix import routing_text

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
# The mock's model of a prompt cache: the last few prompts per model stay
# "warm", as a real engine keeps as many KV states as engine.prompt_cache_mib
# holds, and are what `warm_prompts` reports (routing tests see a node forget
# a prefix once enough others came after it). prompt_eval_count stays the
# whole prompt's word count: the mock does not model the saving.
WARM_PROMPTS = 4


class MockEngine:
    kind = "mock"
    uses_store = True
    continues = True  # word i is a function of the prompt and i: a continuation resumes exactly

    def __init__(self, cfg: EngineSection) -> None:
        self.cfg = cfg
        self._loaded: dict[str, LoadedModel] = {}
        self._warm: dict[str, collections.OrderedDict[str, None]] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._loaded.clear()

    def configure(self, num_parallel: int, max_loaded_models: int) -> None:
        self.cfg.num_parallel = num_parallel
        self.cfg.max_loaded_models = max_loaded_models

    def _mark(self, record: ModelRecord) -> None:
        self._loaded[record.name.short] = LoadedModel(
            name=record.name.short, digest=record.digest, size=record.size,
            expires_at=None, details=record.details, context_length=self.cfg.num_ctx,
        )

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float:
        assert record is not None
        self._mark(record)
        return 0.0

    async def unload(self, model: str) -> None:
        self._loaded.pop(model, None)
        self._warm.pop(model, None)

    def warm_prompts(self) -> dict[str, list[str]]:
        return {m: list(reversed(p)) for m, p in self._warm.items() if p}

    def _remember(self, model: str, prompt: str) -> None:
        """`prompt` becomes the most recent warm one of `model`."""
        warm = self._warm.setdefault(model, collections.OrderedDict())
        warm[prompt] = None
        warm.move_to_end(prompt)
        while len(warm) > WARM_PROMPTS:
            warm.popitem(last=False)

    def touch(self, model: str, keep_alive: float | None) -> None:
        if model in self._loaded:
            self._loaded[model].expires_at = None if keep_alive is None else time.time() + keep_alive

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    async def list_models(self) -> list[dict[str, Any]]:
        return []

    async def generate(
        self, req: InferenceRequest, record: ModelRecord | None, slot: int, cancel: CancelToken
    ) -> AsyncGenerator[dict[str, Any], None]:
        assert record is not None
        t0 = time.perf_counter()
        self._mark(record)
        opts = opt.normalise(req.options, record.parameters)
        n = int(opts.get("num_predict", self.cfg.mock_tokens))
        limited = n >= 0 and "num_predict" in opts  # a client's limit ends it at "length", as a model would
        if n < 0:
            n = self.cfg.mock_tokens
        skip = len(req.continuation)  # the dispatcher already took them off num_predict
        if not limited:
            n = max(0, n - skip)
        if self.cfg.mock_ttft_ms > 0:
            await asyncio.sleep(self.cfg.mock_ttft_ms / 1000)
        first = time.perf_counter()
        gap = 1.0 / self.cfg.mock_tokens_per_second if self.cfg.mock_tokens_per_second > 0 else 0.0
        seed = (req.prompt or str(req.messages)).encode()
        base = hashlib.sha256(seed).digest()[0]
        prompt = routing_text(req, record)
        if prompt:
            self._remember(record.name.short, prompt)
        if req.think and not skip:
            yield {"thinking": "mock thinking. ", "tokens": []}
        call = _tool_call(req) if not skip else None
        if call is not None:
            n = 0
            yield {"tool_calls": [call]}
        fail_at = self.cfg.mock_fail_after_tokens
        for i in range(skip, skip + n):
            if cancel.cancelled:
                return
            if fail_at and i == fail_at and not skip:
                raise EngineError(f"mock failure injected after {fail_at} tokens "
                                  "(engine.mock_fail_after_tokens)")
            if gap:
                await asyncio.sleep(gap)
            elif i % 64 == 63:
                await asyncio.sleep(0)  # stay fair to other streams at zero delay
            word = _WORDS[(base + i) % len(_WORDS)] + " "
            chunk: dict[str, Any] = {"text": word, "tokens": [(base + i) % len(_WORDS)]}
            if req.logprobs:
                chunk["logprobs"] = [_logprob(word, (base + i) % len(_WORDS), req.top_logprobs)]
            yield chunk
        end = time.perf_counter()
        yield {
            "done": True, "done_reason": "length" if n and limited else "stop",
            "prompt_eval_count": len(seed.split()), "prompt_eval_duration": int((first - t0) * 1e9),
            "eval_count": n, "eval_duration": int((end - first) * 1e9),
            "load_duration": 0, "total_duration": int((end - t0) * 1e9),
        }

    async def embed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        assert record is not None
        vecs = []
        for text in req.input:
            h = hashlib.sha256(text.encode()).digest()
            vecs.append([(b - 128) / 128 for b in h[:16]])
        return {"embeddings": vecs, "prompt_eval_count": sum(len(t.split()) for t in req.input),
                "load_duration": 0, "total_duration": 0}


def _logprob(word: str, index: int, top: int) -> dict[str, Any]:
    """The word at probability 1/2, the others sharing the rest: a valid distribution."""
    def entry(w: str, p: float) -> dict[str, Any]:
        return {"token": w, "logprob": math.log(p), "bytes": list(w.encode())}

    rest = 0.5 / (len(_WORDS) - 1)
    out = entry(word, 0.5)
    if top:
        others = [_WORDS[(index + k) % len(_WORDS)] + " " for k in range(1, len(_WORDS))]
        out["top_logprobs"] = [entry(word, 0.5), *(entry(w, rest) for w in others)][:top]
    return out


def _tool_call(req: InferenceRequest) -> dict[str, Any] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    if req.messages and req.messages[-1].get("role") == "tool":
        return None  # the result is in: answer in words
    fn = req.tools[0].get("function", {})
    if isinstance(req.tool_choice, dict):
        wanted = (req.tool_choice.get("function") or {}).get("name")
        fn = next((t.get("function", {}) for t in req.tools if t.get("function", {}).get("name") == wanted), fn)
    params = fn.get("parameters") or {}
    args = {k: "mock" for k in params.get("required", [])}
    digest = hashlib.sha256(repr((fn.get("name"), req.messages)).encode()).hexdigest()[:8]
    return {"id": f"call_{digest}", "function": {"index": 0, "name": fn.get("name", ""), "arguments": args}}
