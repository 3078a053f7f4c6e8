"""A synthetic engine for load-testing the cluster layer: configurable time to
first token and token rate, deterministic words. Never a default: it exists so
relay overhead can be measured without the model's own cost in the way."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator
from typing import Any

from ..config import EngineSection
from ..models.store import ModelRecord
from . import options as opt
from .base import CancelToken, InferenceRequest, LoadedModel

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


class MockEngine:
    kind = "mock"
    uses_store = True

    def __init__(self, cfg: EngineSection) -> None:
        self.cfg = cfg
        self._loaded: dict[str, LoadedModel] = {}

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
            expires_at=None, details=record.details,
        )

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float:
        assert record is not None
        self._mark(record)
        return 0.0

    async def unload(self, model: str) -> None:
        self._loaded.pop(model, None)

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
        if n < 0:
            n = self.cfg.mock_tokens
        if self.cfg.mock_ttft_ms > 0:
            await asyncio.sleep(self.cfg.mock_ttft_ms / 1000)
        first = time.perf_counter()
        gap = 1.0 / self.cfg.mock_tokens_per_second if self.cfg.mock_tokens_per_second > 0 else 0.0
        seed = (req.prompt or str(req.messages)).encode()
        base = hashlib.sha256(seed).digest()[0]
        for i in range(n):
            if cancel.cancelled:
                return
            if gap:
                await asyncio.sleep(gap)
            elif i % 64 == 63:
                await asyncio.sleep(0)  # stay fair to other streams at zero delay
            yield {"text": _WORDS[(base + i) % len(_WORDS)] + " "}
        end = time.perf_counter()
        yield {
            "done": True, "done_reason": "length" if n else "stop",
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
