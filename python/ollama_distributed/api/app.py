"""The API application: routes, error mapping, body limit, access log, and the
guard (origin, host, API keys and limits: api/guard.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..dispatch import NOTE, RequestNote
from ..errors import OllamaDistributedError, OverloadedError, TenantLimitedError
from . import anthropic, cluster, guard, ollama, openai, openapi, responses, tenancy

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("ollama_distributed.access")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_error = guard.error


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OllamaDistributedError as e:
        headers = ({"Retry-After": str(e.retry_after)} if isinstance(e, OverloadedError | TenantLimitedError)
                   else None)
        if e.status >= 500:
            logger.warning("%s %s: %s", request.method, request.path, e.message)
        if e.status == 429:
            return _error(request, 429, e.message, headers, kind="rate_limit_error", code="rate_limit_exceeded")
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


# Not counted: Prometheus scrapes it every few seconds, and a count that moves
# because it is read would make `requests_total` disagree with itself.
UNCOUNTED = frozenset({"/metrics"})


def _endpoint(request: web.Request) -> str:
    """The route's pattern (`/v1/models/{model}`), so paths do not explode the labels."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "(unmatched)"


def access_middleware(node: Node) -> Middleware:
    """One log line and one count per request, every endpoint and status.

    Outermost, so it sees the status the error and auth middlewares answered
    with. A request the dispatcher ran is counted with the dispatcher's outcome
    (see `dispatch.RequestNote`), once, here."""

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        note = RequestNote()
        request["note"] = note  # for answers prepared after this returns (X-Queue-Position)
        token = NOTE.set(note)
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except (asyncio.CancelledError, ConnectionResetError, BrokenPipeError):
            status = 499  # the client went away (nginx's convention)
            raise
        finally:
            NOTE.reset(token)
            duration = time.perf_counter() - t0
            if note.status is not None:
                status = note.status
            endpoint = _endpoint(request)
            if endpoint not in UNCOUNTED:
                node.dispatcher.count(note.model, endpoint, status, duration)
            level = logging.DEBUG if node.cfg.logging.access == "debug" else logging.INFO
            if access_logger.isEnabledFor(level):
                access_logger.log(level, "%s %s %d %.3fs model=%s client=%s", request.method, request.path,
                                  status, duration, note.model or "-", request.remote or "-")

    return access


def create_app(node: Node) -> web.Application:
    app = web.Application(
        client_max_size=node.cfg.api.max_body_bytes,
        middlewares=[access_middleware(node), errors],
    )
    app["node"] = node
    guard.install(app, node, node.cfg.api.host, node.http_ports)
    tenancy.install(app, node)
    ollama.add_routes(app)
    openai.add_routes(app)
    anthropic.add_routes(app)
    responses.add_routes(app)
    cluster.add_routes(app)
    openapi.add_routes(app)
    return app
