"""The local admin socket: `<data dir>/admin.sock`, a unix socket of mode 0600
owned by the user the node runs as. Whoever can open it is the node's
operator, so it needs no key: it is how `ollama-distributed keys ...` makes
the first admin key and how `cluster token` reads the join token, without
either ever crossing a TCP port.

    GET    /token          {"token"}       409 without a cluster
    POST   /token/rotate   {"token"}       a new join secret cluster-wide; 409 without a cluster
    GET    /keys           {"keys": [{name, role, rpm, tpm, weight, priority, created, last_used}]}
    POST   /keys           {"name", "role"?, "rpm"?, "tpm"?, "weight"?, "priority"?} -> {"key", name, role, ...}
    DELETE /keys/{name}    {"revoked": name, "keys_left": n}
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .app import errors
from .common import field, read_json

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger(__name__)
SOCKET = "admin.sock"
MAX_PATH = 107  # sun_path holds 108 bytes with the NUL


def _node(request: web.Request) -> Node:
    node: Node = request.app["node"]
    return node


async def token(request: web.Request) -> web.Response:
    node = _node(request)
    value = node.cluster.join_token() if node.cluster is not None else None
    if not value:
        return web.json_response({"error": f"no cluster is running on this node ({node.p2p_reason})"},
                                 status=409)
    return web.json_response({"token": value})


async def rotate_token(request: web.Request) -> web.Response:
    node = _node(request)
    if node.cluster is None:
        return web.json_response({"error": f"no cluster is running on this node ({node.p2p_reason})"},
                                 status=409)
    value = await node.cluster.rotate_join_token()
    logger.warning("join token rotated: tokens given out before no longer join")
    return web.json_response({"token": value})


async def list_keys(request: web.Request) -> web.Response:
    node = _node(request)
    node.keys.refresh()
    return web.json_response({"keys": node.keys.listing(), "storage": node.keys_storage()})


async def create_key(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = field(body, "name", str, required=True)
    secret, rec = await _node(request).keys.create(name, field(body, "role", str, "user"),
                                                   field(body, "rpm", int, 0), field(body, "tpm", int, 0),
                                                   field(body, "weight", (int, float), 1.0),
                                                   field(body, "priority", str, "interactive"))
    logger.info("API key %r created (role %s, rpm %d, tpm %d, weight %g, priority %s)", rec.name, rec.role,
                rec.rpm, rec.tpm, rec.weight, rec.priority)
    return web.json_response({"key": secret, **rec.public()}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    keys = _node(request).keys
    await keys.revoke(name)
    logger.info("API key %r revoked", name)
    return web.json_response({"revoked": name, "keys_left": len(keys.records())})


def create_admin_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=64 * 1024)
    app["node"] = node
    app.router.add_get("/token", token)
    app.router.add_post("/token/rotate", rotate_token)
    app.router.add_get("/keys", list_keys)
    app.router.add_post("/keys", create_key)
    app.router.add_delete("/keys/{name}", revoke_key)
    return app


def bind(path: Path) -> socket.socket | None:
    """A listening unix socket at `path` that only this user can open; None
    (with a warning) when the path is too long for a unix socket."""
    if len(os.fsencode(path)) > MAX_PATH:
        logger.warning("no admin socket: %s is longer than a unix socket path may be (%d bytes); use a "
                       "shorter data dir for `keys` and `cluster token` to reach this node", path, MAX_PATH)
        return None
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a node that did not stop cleanly; the data dir is this node's alone
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen(): nobody else can connect in between
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
