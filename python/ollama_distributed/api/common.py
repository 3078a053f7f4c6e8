"""Shared pieces of the HTTP layer: body parsing, errors, streaming."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from ..errors import BadRequestError, OllamaDistributedError, OverloadedError

logger = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def error_response(e: OllamaDistributedError) -> web.Response:
    headers = {}
    if isinstance(e, OverloadedError):
        headers["Retry-After"] = str(e.retry_after)
    return web.json_response({"error": e.message}, status=e.status, headers=headers)


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
    except OllamaDistributedError as e:
        await _aclose(source)
        return error_response(e)
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
