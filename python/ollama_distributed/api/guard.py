"""The doors of the HTTP ports (API and dashboard), one middleware each:

1. `Host` (DNS rebinding) and `Origin` (CSRF) checks, before anything runs:
   403, with no effect. CORS preflights from allowed origins are answered
   here, and answers to allowed origins carry the CORS headers.
2. API keys, once any exists (or `api.auth_tokens` is set; those are admin
   keys): `Authorization: Bearer KEY` or `x-api-key: KEY` on every path but
   the open ones; 401 with WWW-Authenticate when missing or wrong, 403 for a
   `user` key on an admin path.
3. The key's limits: 429 with Retry-After (whole seconds).

Errors use Ollama's shape, Anthropic's under /v1/messages, OpenAI's under
the rest of /v1/. Every outcome is counted in
`ollama_distributed_auth_requests_total{key, outcome}`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..security.keys import KeyRecord
from ..security.limits import charge_tokens, retry_after
from ..security.origins import OriginPolicy

if TYPE_CHECKING:
    from ..node import Node

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Reachable without a key: liveness probes and the "is it running" banner.
OPEN_GET = frozenset({"/", "/health", "/health/live", "/health/ready"})
# What a `user` key may do: inference and reads. Everything else is admin.
USER_POST = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
                       "/api/playground"})
USER_GET = frozenset({"/api/tags", "/api/ps", "/api/version", "/api/openapi.json", "/metrics",
                      "/api/state", "/ws"})
CORS_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, X-Api-Key, User-Agent, Accept, X-Requested-With, X-Priority"
# What a page may read of an answer besides the safelisted headers.
CORS_EXPOSE = "Retry-After, X-Queue-Position"
ADMIN_CONFIG = "config"  # the key name metrics and logs give api.auth_tokens
# A browser's WebSocket cannot send headers: the dashboard offers its key as
# the subprotocol "bearer.<key>" on /ws.
WS_KEY_PROTOCOL = "bearer."


def error(request: web.Request, status: int, message: str, headers: dict[str, str] | None = None,
          kind: str | None = None, code: str | None = None) -> web.Response:
    """Ollama's error shape, Anthropic's under /v1/messages, OpenAI's under the rest of /v1/."""
    if request.path.startswith("/v1/messages"):
        from .anthropic import error_body

        return web.json_response(error_body(status, message), status=status, headers=headers)
    if request.path.startswith("/v1/"):
        kind = kind or ("invalid_request_error" if status < 500 else "api_error")
        body: dict[str, object] = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status, headers=headers)


def is_open(request: web.Request) -> bool:
    return request.method in ("GET", "HEAD") and request.path in OPEN_GET


def is_user_path(request: web.Request) -> bool:
    path, method = request.path, request.method
    if path.startswith("/v1/"):
        return True
    if method in ("GET", "HEAD"):
        return path in USER_GET or path.startswith("/api/distributed/")
    return method == "POST" and path in USER_POST


def presented_key(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    key = request.headers.get("x-api-key", "").strip()
    if not key and request.path == "/ws":
        for p in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            if p.strip().startswith(WS_KEY_PROTOCOL):
                return p.strip()[len(WS_KEY_PROTOCOL):]
    return key


class Guard:
    """One port's policy; `auth` False leaves keys to the handlers (the dashboard's index)."""

    def __init__(self, node: Node, bind_host: str, ports: list[int]) -> None:
        self.node = node
        self.bind_host = bind_host
        self.ports = ports
        self.reconfigure()
        self.counter = node.metrics.auth_requests

    def reconfigure(self) -> None:
        """(Re)build the origin and Host rules from the node's config (SIGHUP)."""
        api = self.node.cfg.api
        self.policy = OriginPolicy(self.bind_host, self.ports, list(api.cors_origins), list(api.allowed_hosts))

    def count(self, key: str, outcome: str) -> None:
        self.counter.labels(key, outcome).inc()

    def identify(self, secret: str) -> KeyRecord | None:
        """The key record for `secret`; api.auth_tokens act as admin keys."""
        rec = self.node.keys.lookup(secret) if secret else None
        if rec is not None:
            return rec
        if secret and any(hmac.compare_digest(secret.encode(), t.encode()) for t in self.node.cfg.api.auth_tokens):
            return KeyRecord(name=ADMIN_CONFIG, hash="", role="admin")
        return None

    def keys_in_force(self) -> bool:
        return self.node.keys.active or bool(self.node.cfg.api.auth_tokens)

    def middleware(self) -> Middleware:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not self.policy.host_allowed(request.headers.get("Host")):
                self.count("-", "bad_host")
                return error(request, 403, f"host {request.headers.get('Host')!r} is not allowed: this port "
                             "binds a loopback address; reach it as localhost or 127.0.0.1, or add the name "
                             "to api.allowed_hosts", code="forbidden")
            origin = request.headers.get("Origin")
            if origin is not None:
                if not self.policy.origin_allowed(origin):
                    self.count("-", "bad_origin")
                    return error(request, 403, f"origin {origin!r} is not allowed; add it to "
                                 "api.cors_origins to let that web page call this node", code="forbidden")
                if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                    return web.Response(status=204, headers={
                        "Access-Control-Allow-Origin": origin, "Vary": "Origin",
                        "Access-Control-Allow-Methods": CORS_METHODS,
                        "Access-Control-Allow-Headers": CORS_HEADERS,
                        "Access-Control-Max-Age": "600"})
            if is_open(request) or not self.keys_in_force():
                return await handler(request)
            rec = self.identify(presented_key(request))
            if rec is None:
                self.count("-", "unauthorized")
                return error(request, 401, "unauthorized: send 'Authorization: Bearer KEY' with an API key "
                             "(`ollama-distributed keys create NAME` on the node makes one) or one of "
                             "api.auth_tokens", {"WWW-Authenticate": 'Bearer realm="ollama-distributed"'},
                             kind="authentication_error", code="invalid_api_key")
            if rec.role != "admin" and not is_user_path(request):
                self.count(rec.name, "forbidden")
                return error(request, 403, f"key {rec.name!r} has role user: {request.method} {request.path} "
                             "needs an admin key", kind="permission_error", code="forbidden")
            keys = self.node.keys
            if rec.rpm or rec.tpm:
                wait = keys.admit(rec, time.monotonic())
                if wait > 0:
                    self.count(rec.name, "rate_limited")
                    after = retry_after(wait)
                    limits = ", ".join(f"{n} {k}" for k, n in (("requests", rec.rpm), ("tokens", rec.tpm)) if n)
                    return error(request, 429, f"rate limit of key {rec.name!r} reached ({limits} per minute); "
                                 f"retry in {after} s", {"Retry-After": str(after)},
                                 kind="rate_limit_error", code="rate_limit_exceeded")
            else:
                keys.last_used[rec.name] = time.time()
            self.count(rec.name, "ok")
            request["api_key"] = rec
            if rec.tpm:
                token = charge_tokens.set(lambda n: keys.charge(rec, n))
                try:
                    return await handler(request)
                finally:
                    charge_tokens.reset(token)
            return await handler(request)

        return guard

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORS headers on every answer to an allowed origin (streams included)."""
        origin = request.headers.get("Origin")
        if origin is not None and self.policy.origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
            response.headers["Vary"] = "Origin"


def install(app: web.Application, node: Node, bind_host: str, ports: list[int]) -> Guard:
    """Put the guard in front of `app`'s handlers (after the error mapper)."""
    guard = Guard(node, bind_host, ports)
    if isinstance(getattr(node, "guards", None), list):
        node.guards.append(guard)
    app.middlewares.append(guard.middleware())
    app.on_response_prepare.append(guard.on_prepare)
    return guard
