"""Who a request is served as, and at which priority, for the local queue's
fairness (rust/scheduler/fair.rs).

- Tenant: the API key's name when keys are in force; otherwise the client's
  address, or the `X-Tenant` header when the request comes from one of
  `api.trusted_proxies` (from anyone else the header is ignored: a client
  must not be able to pick another's share).
- Priority: the `X-Priority` header (`interactive` or `batch`), else the
  key's default, else interactive. Any other value is a 400.
- Weight: the key's (`keys create --weight`), else 1.

The answer goes into the request's `dispatch.RequestNote`; the dispatcher
copies it into the `InferenceRequest`, which carries it to the node that
serves it. The note also brings back the request's queue position, sent as
`X-Queue-Position` (the place it had in the queue of the node that ran it;
0 when it ran at once).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..dispatch import NOTE
from ..engines.base import MAX_TENANT, PRIORITIES
from ..errors import BadRequestError

if TYPE_CHECKING:
    from ..node import Node

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A tenant named by a proxy: visible ASCII, as a header value can carry safely
# into logs and JSON.
TENANT_RE = re.compile(rf"^[\x21-\x7e]{{1,{MAX_TENANT}}}$")
QUEUE_HEADER = "X-Queue-Position"


def parse_priority(value: str | None, default: str = "interactive") -> str:
    """The X-Priority header's class; 400 for anything but the known ones."""
    if value is None:
        return default
    p = value.strip().lower()
    if p not in PRIORITIES:
        raise BadRequestError(f"X-Priority must be one of {', '.join(PRIORITIES)}; got {value[:64]!r}")
    return p


def networks(entries: list[str]) -> list[IpNetwork]:
    """api.trusted_proxies as networks (config.py has checked them)."""
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def trusted(remote: str | None, proxies: list[IpNetwork]) -> bool:
    if not remote or not proxies:
        return False
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(addr in net for net in proxies)


class Tenancy:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.reconfigure()

    def reconfigure(self) -> None:
        self.proxies = networks(list(self.node.cfg.api.trusted_proxies))

    def tenant(self, request: web.Request) -> str:
        rec = request.get("api_key")
        if rec is not None:
            return str(rec.name)
        remote = request.remote or ""
        if trusted(remote, self.proxies):
            named = request.headers.get("X-Tenant")
            if named is not None:
                named = named.strip()
                if not TENANT_RE.match(named):
                    raise BadRequestError(f"X-Tenant must be 1-{MAX_TENANT} visible ASCII characters; "
                                          f"got {named[:64]!r}")
                return named
        return remote

    def middleware(self) -> Middleware:
        @web.middleware
        async def tenancy(request: web.Request, handler: Handler) -> web.StreamResponse:
            note = NOTE.get()
            rec = request.get("api_key")
            priority = parse_priority(request.headers.get("X-Priority"),
                                      getattr(rec, "priority", None) or "interactive")
            if note is not None:
                note.tenant = self.tenant(request)
                note.priority = priority
                note.weight = float(getattr(rec, "weight", 1.0) or 1.0)
            return await handler(request)

        return tenancy


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """X-Queue-Position on the answer of a request that went through a queue."""
    note = request.get("note")
    position = getattr(note, "queue_position", None)
    if isinstance(position, int):
        response.headers[QUEUE_HEADER] = str(position)


def install(app: web.Application, node: Node) -> Tenancy:
    """After the guard (which names the API key)."""
    t = Tenancy(node)
    if isinstance(getattr(node, "tenancies", None), list):
        node.tenancies.append(t)
    app.middlewares.append(t.middleware())
    app.on_response_prepare.append(on_prepare)
    return t
