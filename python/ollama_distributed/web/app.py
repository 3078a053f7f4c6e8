"""The dashboard app on the web port: a page written by hand (no build step),
a JSON snapshot at /api/state (the models with their placement, the blob copies
in progress), a WebSocket at /ws that pushes a snapshot every second, and
/api/playground, which streams an answer through the node's own
dispatcher so the page needs no cross-origin call to the API port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from aiohttp import WSMsgType, web

from ..api import guard
from ..engines.base import InferenceRequest
from ..errors import OllamaDistributedError

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger(__name__)
PUSH_INTERVAL = 1.0
RECENT_SHOWN = 25
# The playground is for trying a model, not for long jobs: cap the answer so a
# stray click cannot hold an engine slot for minutes.
PLAYGROUND_MAX_TOKENS = 512
PLAYGROUND_MAX_PROMPT = 16_000


REPLICATION_SHOWN = ("transfers", "totals", "bandwidth_limit_bytes_per_sec", "models_in_progress",
                     "copies_unplaced")
_replication_error = ""  # the last one logged, so a lasting failure is logged once


def replication(node: Node) -> dict[str, Any] | None:
    """The blob copies in progress and their totals, as
    /api/distributed/replication/status has them; None on a node that does not
    replicate (no cluster core, or an engine without a model store). A failure
    to read them is shown on the page instead of ending the feed."""
    global _replication_error
    if node.replicator is None:
        return None
    try:
        st: dict[str, Any] = node.replicator.status()
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        if message != _replication_error:
            _replication_error = message
            logger.warning("dashboard: replication status failed: %s", message)
        return {"error": message, "transfers": [], "totals": {}}
    _replication_error = ""
    return {k: st.get(k) for k in REPLICATION_SHOWN}


async def snapshot(node: Node) -> dict[str, Any]:
    d = node.dispatcher
    return {
        "at": time.time(),
        "health": node.health(),
        "nodes": node.cluster_nodes(),
        "models": await node.cluster_models(),  # with their placement when the node replicates
        "replication": replication(node),
        "loaded": [m.name for m in node.engine.loaded()],
        # models this node runs split across nodes (engines/split.py) and their shares
        "split": [{"name": m.name, "parts": m.parts} for m in node.engine.loaded() if m.parts],
        "requests_total": d.requests_total,
        "tokens_total": d.tokens_total,
        "text_chunks": d.text_chunks,
        "in_flight": d.scheduler.total_in_flight(),
        "queue_depth": d.scheduler.queue_depth(),
        "recent": [vars(r) for r in list(d.recent)[-RECENT_SHOWN:]][::-1],
        "websocket_connections": node.websocket_connections,
        "services": node.services(),
        "auth_required": bool(node.cfg.api.auth_tokens) or node.keys.active,
    }


async def index(request: web.Request) -> web.Response:
    html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html", headers={
        # Everything the page needs is inline or same-origin; nothing else may load.
        "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                   "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
        "X-Content-Type-Options": "nosniff",
    })


async def state(request: web.Request) -> web.Response:
    return web.json_response(await snapshot(request.app["node"]))


def key_protocol(request: web.Request) -> str | None:
    """The `bearer.<key>` subprotocol a browser offers to prove its key (a
    WebSocket cannot carry an Authorization header); the guard checked it."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    for p in (x.strip() for x in offered.split(",")):
        if p.startswith(guard.WS_KEY_PROTOCOL):
            return p
    return None


async def ws(request: web.Request) -> web.StreamResponse:
    node: Node = request.app["node"]
    if node.websocket_connections >= node.cfg.web.max_clients:
        return web.json_response({"error": f"too many dashboard clients ({node.cfg.web.max_clients}, "
                                  "web.max_clients); close another dashboard tab or raise the limit"},
                                 status=503, headers={"Retry-After": "5"})
    proto = key_protocol(request)
    sock = web.WebSocketResponse(heartbeat=15, protocols=(proto,) if proto else ())
    node.websocket_connections += 1  # counted before the first await, so the cap holds
    reader: asyncio.Task[None] | None = None

    async def drain() -> None:  # notice a close from the browser
        async for msg in sock:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    try:
        await sock.prepare(request)
        logger.debug("dashboard client %s connected (%d now)", request.remote, node.websocket_connections)
        reader = asyncio.create_task(drain())
        while not sock.closed and not reader.done():
            try:
                snap = await snapshot(node)
            except Exception:  # one bad reading must not end the page's feed
                logger.warning("dashboard snapshot failed; retrying", exc_info=True)
                await asyncio.sleep(PUSH_INTERVAL)
                continue
            try:
                await sock.send_json(snap)
            except (ConnectionError, RuntimeError):  # the client vanished mid-send
                break
            await asyncio.sleep(PUSH_INTERVAL)
    finally:
        node.websocket_connections -= 1
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
    return sock


def _line(chunk: dict[str, Any]) -> bytes:
    chunk.pop("context", None)  # token ids: of no use to the page
    return json.dumps(chunk).encode() + b"\n"


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def playground(request: web.Request) -> web.StreamResponse:
    """POST {"model", "prompt", "num_predict"?}: NDJSON lines {"text"} then {"done", ...}."""
    node: Node = request.app["node"]
    # Origin, Host and the key are checked by the guard (api/guard.py).
    if request.content_type != "application/json":
        return _refuse(415, "send the prompt as application/json")
    try:
        body = await request.json()
    except ValueError:
        return _refuse(400, "invalid JSON")
    if not isinstance(body, dict):
        return _refuse(400, "expected a JSON object")
    model, prompt = body.get("model"), body.get("prompt")
    if not isinstance(model, str) or not model:
        return _refuse(400, "choose a model")
    if not isinstance(prompt, str) or not prompt.strip():
        return _refuse(400, "write a prompt")
    if len(prompt) > PLAYGROUND_MAX_PROMPT:
        return _refuse(400, f"the prompt is longer than {PLAYGROUND_MAX_PROMPT} characters")
    n = body.get("num_predict", 128)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= PLAYGROUND_MAX_TOKENS:
        return _refuse(400, f"num_predict must be a whole number from 1 to {PLAYGROUND_MAX_TOKENS}")
    req = InferenceRequest(kind="chat", model=model, messages=[{"role": "user", "content": prompt}],
                           options={"num_predict": n})
    chunks = cast("AsyncGenerator[dict[str, Any], None]", node.dispatcher.stream(req, "/playground"))
    async with contextlib.aclosing(chunks):
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = {"done": True}
        except OllamaDistributedError as e:
            return _refuse(e.status, e.message)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        try:
            await resp.write(_line(first))
            async for chunk in chunks:
                await resp.write(_line(chunk))
        except OllamaDistributedError as e:
            await resp.write(json.dumps({"error": e.message}).encode() + b"\n")
        except ConnectionError:
            return resp  # the page went away; aclosing stops the generation
        await resp.write_eof()
        return resp


def create_web_app(node: Node) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app["node"] = node
    guard.install(app, node, node.cfg.web.host, node.http_ports)
    app.router.add_get("/", index)
    app.router.add_get("/api/state", state)
    app.router.add_get("/ws", ws)
    app.router.add_post("/api/playground", playground)
    return app
