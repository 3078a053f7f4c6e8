"""The API application: routes, error mapping, body limit and bearer auth."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..errors import OllamaDistributedError, OverloadedError
from . import cluster, ollama, openai, openapi

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Reachable without a token even when api.auth_tokens is set: liveness probes.
OPEN_PATHS = frozenset({"/", "/health/live", "/health/ready"})


def _error(request: web.Request, status: int, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    if request.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "api_error"
        body: dict[str, object] = {"error": {"message": message, "type": kind, "param": None,
                                             "code": None}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OllamaDistributedError as e:
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, OverloadedError) else None
        if e.status >= 500:
            logger.warning("%s %s: %s", request.method, request.path, e.message)
        return _error(request, e.status, e.message, headers)
    except web.HTTPRequestEntityTooLarge as e:
        return _error(request, 413, f"request body too large: {e.text or ''}".strip().rstrip(":")
                      + " (limit is api.max_body_bytes)")
    except web.HTTPException as e:
        if e.status >= 400:
            text = {404: "404 page not found", 405: "405 method not allowed"}.get(e.status, e.reason)
            return _error(request, e.status, text)
        raise
    except (ConnectionResetError, BrokenPipeError):
        raise
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return _error(request, 500, "internal server error; see the node's log")


def auth_middleware(node: Node) -> Middleware:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        tokens = node.cfg.api.auth_tokens  # read live: SIGHUP can change it
        if tokens and request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(given.encode(), t.encode()) for t in tokens):
                return _error(request, 401, "unauthorized: send 'Authorization: Bearer <token>' "
                              "with one of api.auth_tokens", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


def create_app(node: Node) -> web.Application:
    app = web.Application(
        client_max_size=node.cfg.api.max_body_bytes,
        middlewares=[errors, auth_middleware(node)],
    )
    app["node"] = node
    ollama.add_routes(app)
    openai.add_routes(app)
    cluster.add_routes(app)
    openapi.add_routes(app)
    return app
