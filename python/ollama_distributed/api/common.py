"""Shared pieces of the HTTP layer: body parsing, errors, streaming."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..dispatch import note_model
from ..errors import BadRequestError, OllamaDistributedError

logger = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


# A \uD800-\uDFFF escape: half of a UTF-16 pair, or alone (not a character;
# llama.cpp's tokenizer and UTF-8 encoding would fail on it deep in the engine).
SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 for anything else, 413 when too big."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise
    if not raw.strip():
        raise BadRequestError("missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    if SURROGATE.search(raw):  # rare: only then pay for a second pass
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequestError("request body holds a lone surrogate escape (such as \\ud800), "
                                  "which is not a character; send valid UTF-16 pairs or UTF-8") from None
    note_model(body.get("model") or body.get("name"))  # for the access log, even when the body is refused
    return body


def field(body: dict[str, Any], key: str, types: type | tuple[type, ...], default: Any = None,
          required: bool = False) -> Any:
    """A typed field: a missing required field or a wrong type is a 400."""
    if key not in body or body[key] is None:
        if required:
            raise BadRequestError(f"{key} is required")
        return default
    value = body[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequestError(f"{key} has the wrong type: got a boolean")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BadRequestError(f"{key} has the wrong type: expected {names}")
    return value


async def first_then_rest(source: AsyncIterator[dict[str, Any]]) -> tuple[dict[str, Any] | None, AsyncIterator[dict[str, Any]]]:
    """Pull the first chunk before any header is sent, so early errors keep their status."""
    try:
        first = await source.__anext__()
    except StopAsyncIteration:
        return None, source
    return first, source


async def stream_lines(
    request: web.Request,
    source: AsyncIterator[dict[str, Any]],
    render: Callable[[dict[str, Any]], bytes | None],
    content_type: str,
    trailer: bytes = b"",
    on_error: Callable[[OllamaDistributedError], bytes] | None = None,
) -> web.StreamResponse:
    """Stream rendered chunks; the first is pulled before the headers go out."""
    try:
        first, rest = await first_then_rest(source)
    except OllamaDistributedError:
        await _aclose(source)
        raise  # no header is out yet: the app's error middleware answers in the path's own shape
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        if first is not None:
            line = render(first)
            if line:
                await resp.write(line)
            async for chunk in rest:
                line = render(chunk)
                if line:
                    await resp.write(line)
        if trailer:
            await resp.write(trailer)
    except OllamaDistributedError as e:
        # Headers are gone; Ollama reports a mid-stream error as a last line.
        if on_error:
            await resp.write(on_error(e))
    except (ConnectionResetError, asyncio.CancelledError):
        await _aclose(source)
        raise
    finally:
        await _aclose(source)
    await resp.write_eof()
    return resp


async def _aclose(source: AsyncIterator[dict[str, Any]]) -> None:
    close = getattr(source, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # cleanup must not mask the real outcome
            logger.debug("error while closing a stream", exc_info=True)


async def collect(source: AsyncIterator[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Run a stream to the end: all its text and its final chunk."""
    parts: list[str] = []
    final: dict[str, Any] = {}
    try:
        async for chunk in source:
            if "text" in chunk:
                parts.append(chunk["text"])
            if chunk.get("done"):
                final = chunk
    finally:
        await _aclose(source)
    return "".join(parts), final


@dataclass
class Gathered:
    """A whole stream, run to its end: what a non-streaming answer is made of."""

    text: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = dataclass_field(default_factory=list)
    logprobs: list[dict[str, Any]] = dataclass_field(default_factory=list)
    final: dict[str, Any] = dataclass_field(default_factory=dict)


async def gather(source: AsyncIterator[dict[str, Any]]) -> Gathered:
    """Run a stream to the end, keeping every kind of chunk (engines/base.py)."""
    out = Gathered()
    text: list[str] = []
    thinking: list[str] = []
    try:
        async for chunk in source:
            if "text" in chunk:
                text.append(chunk["text"])
            if "thinking" in chunk:
                thinking.append(chunk["thinking"])
            out.tool_calls.extend(chunk.get("tool_calls") or [])
            out.logprobs.extend(chunk.get("logprobs") or [])
            if chunk.get("done"):
                out.final = chunk
    finally:
        await _aclose(source)
    out.text, out.thinking = "".join(text), "".join(thinking)
    return out


MAX_TOP_LOGPROBS = 20  # Ollama's and OpenAI's bound


def top_logprobs(body: dict[str, Any], key: str = "top_logprobs") -> int:
    top = field(body, key, int, 0)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequestError(f"{key} must be between 0 and {MAX_TOP_LOGPROBS}")
    return int(top)


def images(value: Any, where: str) -> list[str]:
    """A message's `images`: base64 strings, checked like Ollama decodes them."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadRequestError(f"{where} must be a list of base64-encoded images")
    for i, data in enumerate(value):
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError(f"{where}[{i}] is not valid base64") from None
    return list(value)


def refuse_images(model: str) -> None:
    """No bundled or supported model takes images: Ollama's capability wording."""
    raise BadRequestError(f"{model} does not support vision")


def normalise(v: list[float]) -> list[float]:
    """A unit vector (embeddings cut to `dimensions` are normalised again, as Ollama does)."""
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v] if norm > 0 else v
