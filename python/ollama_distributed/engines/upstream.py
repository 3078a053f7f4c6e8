"""Engines that relay to another server: an OpenAI-compatible one (llama-server,
vLLM, llama_cpp.server) or an Ollama daemon. Models are the upstream's."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp

from ..config import EngineSection
from ..errors import BadRequestError, EngineError, ModelNotFoundError, OverloadedError, PeerUnavailableError
from ..models.store import ModelRecord
from . import options as opt
from .base import CancelToken, InferenceRequest, LoadedModel

logger = logging.getLogger(__name__)

# The upstream's model list is cached this long so each request doesn't pay a round trip.
MODELS_TTL = 10.0


class _Upstream(abc.ABC):
    kind = "upstream"
    uses_store = False
    continues = False  # an upstream takes no token ids: its streams cannot be resumed elsewhere

    def __init__(self, cfg: EngineSection) -> None:
        self.cfg = cfg
        self.base = cfg.upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._models: list[dict[str, Any]] = []
        self._models_at = 0.0
        self._loaded: list[LoadedModel] = []
        # Requests running at the upstream. llama_cpp.server interrupts a running
        # completion when any other request arrives (its interrupt_requests
        # default), so the model list is not re-read while one is in flight.
        self._active = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def stop(self) -> None:
        if self._session:
            await self._session.close()

    def warm_prompts(self) -> dict[str, list[str]]:
        """Nothing: the upstream's cache is out of sight (routing falls back on
        the prefixes this node's router sent it)."""
        return {}

    def configure(self, num_parallel: int, max_loaded_models: int) -> None:
        return None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EngineError("engine not started")
        return self._session

    async def _error(self, resp: aiohttp.ClientResponse, model: str) -> Exception:
        text = await resp.text()
        try:
            body = json.loads(text)
            err = body.get("error")
            msg = err.get("message") if isinstance(err, dict) else err
        except (ValueError, AttributeError):
            msg = None
        msg = msg or text[:200] or resp.reason or "upstream error"
        if resp.status == 404:
            return ModelNotFoundError(model)
        if resp.status == 400:
            return BadRequestError(f"upstream: {msg}")
        if resp.status in (429, 503):
            return OverloadedError(f"upstream is busy: {msg}")
        return EngineError(f"upstream {self.base} answered {resp.status}: {msg}")

    @contextlib.asynccontextmanager
    async def _post(self, path: str, body: dict[str, Any], model: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST to the upstream; the response is released and counted out on exit."""
        self._active += 1
        try:
            try:
                resp = await self.session.post(self.base + path, json=body)
            except aiohttp.ClientError as e:
                raise PeerUnavailableError(f"upstream {self.base} unreachable: {e}") from e
            try:
                if resp.status != 200:
                    raise await self._error(resp, model)
                yield resp
            finally:
                resp.release()
        finally:
            self._active -= 1

    async def _get_json(self, path: str) -> Any:
        try:
            async with self.session.get(self.base + path) as resp:
                if resp.status != 200:
                    raise await self._error(resp, "")
                return await resp.json(content_type=None)
        except aiohttp.ClientError as e:
            raise PeerUnavailableError(f"upstream {self.base} unreachable: {e}") from e
        except ValueError as e:
            raise EngineError(f"upstream {self.base} answered invalid JSON: {e}") from e

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float:
        return 0.0

    async def unload(self, model: str) -> None:
        return None

    def touch(self, model: str, keep_alive: float | None) -> None:
        return None

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded)

    async def list_models(self) -> list[dict[str, Any]]:
        busy = self._active > 0 and self._models_at > 0
        if not busy and time.monotonic() - self._models_at > MODELS_TTL:
            self._models = await self._fetch_models()
            self._models_at = time.monotonic()
        return self._models

    @abc.abstractmethod
    async def _fetch_models(self) -> list[dict[str, Any]]:
        """The upstream's model list, in /api/tags shape."""


class OpenAIUpstreamEngine(_Upstream):
    kind = "openai"

    async def _fetch_models(self) -> list[dict[str, Any]]:
        data = await self._get_json("/v1/models")
        out = []
        for m in (data or {}).get("data", []):
            if isinstance(m, dict) and isinstance(m.get("id"), str):
                out.append({"name": m["id"], "size": 0, "digest": "", "details": {"format": "upstream"},
                            "modified_at": float(m.get("created") or 0)})
        return out

    def _body(self, req: InferenceRequest) -> tuple[str, dict[str, Any]]:
        opts = opt.normalise(req.options)
        body: dict[str, Any] = {"model": req.model, "stream": True,
                                "stream_options": {"include_usage": True}}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                             ("presence_penalty", "presence_penalty"),
                             ("frequency_penalty", "frequency_penalty"), ("top_k", "top_k"),
                             ("min_p", "min_p"), ("repeat_penalty", "repeat_penalty")):
            if ours in opts:
                body[theirs] = opts[ours]
        if opts.get("num_predict", -1) > 0:
            body["max_tokens"] = opts["num_predict"]
        if opts.get("stop"):
            body["stop"] = opts["stop"]
        if req.format == "json":
            body["response_format"] = {"type": "json_object"}
        elif isinstance(req.format, dict):
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": req.format}}
        if req.kind == "generate" and req.raw:
            body["prompt"] = req.prompt
            if req.suffix:
                body["suffix"] = req.suffix
            if req.logprobs:  # the legacy shape: how many alternatives per token
                body["logprobs"] = req.top_logprobs
            return "/v1/completions", body
        if req.logprobs:
            body["logprobs"] = True
            if req.top_logprobs:
                body["top_logprobs"] = req.top_logprobs
        msgs = [_openai_message(m) for m in req.messages] \
            if req.kind == "chat" else [{"role": "user", "content": req.prompt}]
        if req.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": req.system})
        body["messages"] = msgs
        if req.tools:  # passed through as they came; the upstream decides what it supports
            body["tools"] = req.tools
            if req.tool_choice is not None:
                body["tool_choice"] = req.tool_choice
        if req.think is not None:
            body["reasoning_effort"] = ("none" if req.think is False else
                                        "medium" if req.think is True else req.think)
        return "/v1/chat/completions", body

    async def generate(
        self, req: InferenceRequest, record: ModelRecord | None, slot: int, cancel: CancelToken
    ) -> AsyncGenerator[dict[str, Any], None]:
        t0 = time.perf_counter()
        path, body = self._body(req)
        first: float | None = None
        reason = "stop"
        usage: dict[str, Any] = {}
        count = 0
        calls: dict[int, dict[str, Any]] = {}  # streamed tool calls, their arguments in fragments
        try:
            async with self._post(path, body, req.model) as resp:
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise EngineError("upstream sent a malformed stream event") from None
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        delta = choice.get("delta") or choice.get("message") or {}
                        reasoning = delta.get("reasoning") or delta.get("reasoning_content")
                        if reasoning:
                            yield {"thinking": reasoning}
                        for tc in delta.get("tool_calls") or []:
                            _merge_call(calls, tc)
                        text = choice.get("text")
                        if text is None:
                            text = delta.get("content")
                        lps = _from_openai_logprobs(choice.get("logprobs"))
                        if text or lps:
                            if first is None:
                                first = time.perf_counter()
                            count += 1
                            yield {"text": text or "", "logprobs": lps} if lps else {"text": text}
                        if choice.get("finish_reason"):
                            reason = "length" if choice["finish_reason"] == "length" else "stop"
        except aiohttp.ClientError as e:
            raise EngineError(f"upstream stream broke: {e}") from e
        if calls:
            yield {"tool_calls": [_ollama_call(calls[i], n) for n, i in enumerate(sorted(calls))]}
        end = time.perf_counter()
        first = first or end
        yield {
            "done": True, "done_reason": reason,
            "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
            "prompt_eval_duration": int((first - t0) * 1e9),
            "eval_count": int(usage.get("completion_tokens") or count),
            "eval_duration": int((end - first) * 1e9),
            "load_duration": 0, "total_duration": int((end - t0) * 1e9),
        }

    async def embed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            async with self._post("/v1/embeddings", {"model": req.model, "input": req.input},
                                  req.model) as resp:
                data = await resp.json(content_type=None)
        except ValueError as e:
            raise EngineError(f"upstream answered invalid JSON: {e}") from e
        items = sorted(data.get("data", []), key=lambda d: d.get("index", 0))
        vecs = [list(map(float, d["embedding"])) for d in items]
        if req.normalize:
            vecs = [_l2(v) for v in vecs]
        return {"embeddings": vecs,
                "prompt_eval_count": int((data.get("usage") or {}).get("prompt_tokens") or 0),
                "load_duration": 0, "total_duration": int((time.perf_counter() - t0) * 1e9)}


def _openai_message(m: dict[str, Any]) -> dict[str, Any]:
    """An internal (Ollama-shaped) message as OpenAI's chat API takes it."""
    out: dict[str, Any] = {"role": m.get("role", "user"), "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.get("id") or f"call_{i}", "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": json.dumps(c["function"].get("arguments") or {})}}
            for i, c in enumerate(m["tool_calls"])]
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("thinking"):
        out["reasoning_content"] = m["thinking"]
    return out


def _merge_call(calls: dict[int, dict[str, Any]], tc: dict[str, Any]) -> None:
    """One streamed tool-call delta into the call at its index."""
    idx = tc.get("index", len(calls)) if isinstance(tc.get("index"), int) else len(calls)
    call = calls.setdefault(idx, {"id": "", "name": "", "arguments": ""})
    if tc.get("id"):
        call["id"] = tc["id"]
    fn = tc.get("function") or {}
    if fn.get("name"):
        call["name"] += fn["name"]
    args = fn.get("arguments")
    if isinstance(args, dict):
        call["arguments"] = json.dumps(args)
    elif isinstance(args, str):
        call["arguments"] += args


def _ollama_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    try:
        args = json.loads(call["arguments"]) if call["arguments"].strip() else {}
    except ValueError:
        raise EngineError(f"upstream sent tool call arguments that are not JSON: {call['arguments'][:200]}") from None
    return {"id": call["id"] or f"call_{index}", "function": {"index": index, "name": call["name"],
                                                              "arguments": args if isinstance(args, dict) else {}}}


def _from_openai_logprobs(lp: Any) -> list[dict[str, Any]]:
    """OpenAI's chat (`content`) or legacy completions logprobs as our entries."""
    if not isinstance(lp, dict):
        return []
    if isinstance(lp.get("content"), list):
        return [{"token": e.get("token", ""), "logprob": e.get("logprob", 0.0), "bytes": e.get("bytes") or [],
                 **({"top_logprobs": e["top_logprobs"]} if e.get("top_logprobs") else {})}
                for e in lp["content"] if isinstance(e, dict)]
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    out = []
    for token, value, top in zip(tokens, values, tops, strict=False):
        entry: dict[str, Any] = {"token": token, "logprob": value, "bytes": list(token.encode())}
        if isinstance(top, dict) and top:
            entry["top_logprobs"] = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top.items()]
        out.append(entry)
    return out


def _l2(v: list[float]) -> list[float]:
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v] if n else v


class OllamaUpstreamEngine(_Upstream):
    kind = "ollama"

    async def start(self) -> None:
        await super().start()
        self._ps_task = asyncio.create_task(self._refresh_ps(), name="ollama-upstream-ps")

    async def stop(self) -> None:
        self._ps_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ps_task
        await super().stop()

    async def _refresh_ps(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                data = await self._get_json("/api/ps")
                self._loaded = [
                    LoadedModel(name=m["name"], digest=m.get("digest", ""), size=int(m.get("size", 0)),
                                expires_at=None, details=m.get("details") or {})
                    for m in (data or {}).get("models", []) if isinstance(m, dict) and "name" in m
                ]
            await asyncio.sleep(2.0)

    async def _fetch_models(self) -> list[dict[str, Any]]:
        data = await self._get_json("/api/tags")
        return [m for m in (data or {}).get("models", []) if isinstance(m, dict) and "name" in m]

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float:
        t0 = time.perf_counter()
        body: dict[str, Any] = {"model": req.model, "prompt": "", "stream": False}
        if req.keep_alive is not None:
            body["keep_alive"] = req.keep_alive
        async with self._post("/api/generate", body, req.model):
            pass
        return time.perf_counter() - t0

    async def unload(self, model: str) -> None:
        async with self._post("/api/generate", {"model": model, "keep_alive": 0, "stream": False}, model):
            pass

    async def generate(
        self, req: InferenceRequest, record: ModelRecord | None, slot: int, cancel: CancelToken
    ) -> AsyncGenerator[dict[str, Any], None]:
        body: dict[str, Any] = {"model": req.model, "stream": True, "options": req.options}
        if req.format is not None:
            body["format"] = req.format
        if req.keep_alive is not None:
            body["keep_alive"] = req.keep_alive
        if req.think is not None:
            body["think"] = req.think
        if req.kind == "chat":
            path = "/api/chat"
            body["messages"] = req.messages
            if req.tools:
                body["tools"] = req.tools
                if req.tool_choice is not None:  # Ollama ignores it; a node of ours honours it
                    body["tool_choice"] = req.tool_choice
        else:
            path = "/api/generate"
            body.update(prompt=req.prompt, raw=req.raw)
            for key in ("system", "template", "context"):
                if getattr(req, key) is not None:
                    body[key] = getattr(req, key)
            if req.suffix:
                body["suffix"] = req.suffix
        # logprobs and the window's handling pass through as Ollama names them, only when set
        if req.logprobs:
            body["logprobs"] = True
            if req.top_logprobs:
                body["top_logprobs"] = req.top_logprobs
        if not req.shift:
            body["shift"] = False
        if not req.truncate:
            body["truncate"] = False
        try:
            async with self._post(path, body, req.model) as resp:
                async for raw in resp.content:
                    if not raw.strip():
                        continue
                    try:
                        chunk = json.loads(raw)
                    except ValueError:
                        raise EngineError("upstream sent a malformed NDJSON line") from None
                    if "error" in chunk:
                        raise EngineError(f"upstream: {chunk['error']}")
                    text = chunk.get("response")
                    message = chunk.get("message") or {}
                    if text is None:
                        text = message.get("content")
                    thinking = chunk.get("thinking") or message.get("thinking")
                    if thinking:
                        yield {"thinking": thinking}
                    if message.get("tool_calls"):
                        yield {"tool_calls": message["tool_calls"]}
                    if chunk.get("logprobs"):  # they ride on the text they came with
                        yield {"text": text or "", "logprobs": chunk["logprobs"]}
                        text = ""
                    if chunk.get("done"):
                        if text:
                            yield {"text": text}
                        final = {k: chunk[k] for k in (
                            "done_reason", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                            "eval_duration", "load_duration", "total_duration", "context") if k in chunk}
                        final["done"] = True
                        final.setdefault("done_reason", "stop")
                        yield final
                        return
                    if text:
                        yield {"text": text}
        except aiohttp.ClientError as e:
            raise EngineError(f"upstream stream broke: {e}") from e
        raise EngineError("upstream stream ended without a final chunk")

    async def embed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": req.model, "input": req.input, "truncate": req.truncate}
        if req.dimensions:
            body["dimensions"] = req.dimensions
        if req.options:
            body["options"] = req.options
        try:
            async with self._post("/api/embed", body, req.model) as resp:
                data = await resp.json(content_type=None)
        except ValueError as e:
            raise EngineError(f"upstream answered invalid JSON: {e}") from e
        vecs = data.get("embeddings") or []
        return {"embeddings": vecs, "prompt_eval_count": int(data.get("prompt_eval_count") or 0),
                "load_duration": int(data.get("load_duration") or 0),
                "total_duration": int(data.get("total_duration") or 0)}
