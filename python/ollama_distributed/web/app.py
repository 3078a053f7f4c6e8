"""The dashboard app on the web port: a page written by hand (no build step),
a JSON snapshot, and a WebSocket at /ws that pushes a snapshot every second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger(__name__)
PUSH_INTERVAL = 1.0


async def snapshot(node: Node) -> dict[str, Any]:
    d = node.dispatcher
    return {
        "at": time.time(),
        "health": node.health(),
        "nodes": node.cluster_nodes(),
        "models": await node.cluster_models(),
        "loaded": [m.name for m in node.engine.loaded()],
        "requests_total": d.requests_total,
        "tokens_total": d.tokens_total,
        "in_flight": d.scheduler.total_in_flight(),
        "queue_depth": d.scheduler.queue_depth(),
        "recent": [vars(r) for r in list(d.recent)[-20:]],
        "websocket_connections": node.websocket_connections,
    }


async def index(request: web.Request) -> web.Response:
    html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html")


async def state(request: web.Request) -> web.Response:
    return web.json_response(await snapshot(request.app["node"]))


async def ws(request: web.Request) -> web.WebSocketResponse:
    node: Node = request.app["node"]
    sock = web.WebSocketResponse(heartbeat=15)
    await sock.prepare(request)
    node.websocket_connections += 1

    async def drain() -> None:  # notice a close from the browser
        async for msg in sock:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    reader = asyncio.create_task(drain())
    try:
        while not sock.closed and not reader.done():
            try:
                await sock.send_json(await snapshot(node))
            except (ConnectionResetError, RuntimeError):
                break
            await asyncio.sleep(PUSH_INTERVAL)
    finally:
        node.websocket_connections -= 1
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
    return sock


def create_web_app(node: Node) -> web.Application:
    app = web.Application()
    app["node"] = node
    app.router.add_get("/", index)
    app.router.add_get("/api/state", state)
    app.router.add_get("/ws", ws)
    return app
