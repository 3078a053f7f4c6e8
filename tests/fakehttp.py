"""Tiny HTTP servers on 127.0.0.1 for the bad-input cases of the CLI: a server
that is not a node, one that answers garbage, and hand-made node answers
(degraded, a peer list, a skewed clock) that a single real node cannot give."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# path -> (status, content type, body); a callable is evaluated per request
Route = tuple[int, str, bytes] | Callable[[], tuple[int, str, bytes]]


@contextmanager
def serve(routes: dict[str, Route], default: tuple[int, str, bytes] | None = None) -> Iterator[str]:
    """Serve `routes` on a free port; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?")[0]) or default or (404, "text/html",
                                                                       b"<h1>Not Found</h1>")
            status, ctype, body = route() if callable(route) else route
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as url:
        yield url


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run `handler` on a free port of 127.0.0.1 in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def js(obj: Any, status: int = 200) -> Callable[[], tuple[int, str, bytes]]:
    return lambda: (status, "application/json", json.dumps(obj).encode())


def iso(offset: float = 0.0) -> str:
    t = datetime.now(UTC) + timedelta(seconds=offset)
    return t.isoformat().replace("+00:00", "Z")


def node_routes(node_id: str, status: str = "healthy", clock_offset: float = 0.0,
                peers: list[dict[str, Any]] | None = None) -> dict[str, Route]:
    """The answers of a node, shaped like the real ones."""
    def health():
        return (200, "application/json", json.dumps({
            "status": status, "timestamp": iso(clock_offset), "version": "0.1.0", "node_id": node_id,
            "uptime_seconds": 61, "services": {"api": True, "p2p": bool(peers), "p2p_peers": len(peers or []),
                                               "engine": "mock", "available_nodes": 1 + len(peers or [])},
        }).encode())
    nodes = [{"id": node_id, "status": "active", "role": "leader", "local": True, "models": [], "loaded_models": [], "resources": {}}, *list(peers or [])]
    return {
        "/health": health,
        "/health/live": js({"status": "alive"}),
        "/api/distributed/status": js({"node_id": node_id, "role": "leader", "cluster_size": len(nodes),
                                       "active_nodes": [n["id"] for n in nodes], "leader_id": node_id,
                                       "services": {}}),
        "/api/distributed/nodes": js({"nodes": nodes}),
        "/api/distributed/models": js({"models": []}),
    }
