"""Health and cluster endpoints, with values read from the running node."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..errors import BadRequestError, ConflictError
from ..models import names
from .common import field, now_iso, read_json

if TYPE_CHECKING:
    from ..node import Node


def _node(request: web.Request) -> Node:
    node: Node = request.app["node"]
    return node


async def health(request: web.Request) -> web.Response:
    node = _node(request)
    h = node.health()
    return web.json_response(h, status=200 if h["status"] != "unhealthy" else 503)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive", "timestamp": now_iso()})


async def ready(request: web.Request) -> web.Response:
    node = _node(request)
    ok = node.ready and not node.draining  # a draining node takes nothing new: balancers move on
    state = "ready" if ok else "draining" if node.draining else "starting"
    return web.json_response({"status": state, "timestamp": now_iso()}, status=200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    node = _node(request)
    d = node.dispatcher
    nodes = node.cluster_nodes()
    active = [n["id"] for n in nodes if n["status"] == "active"]
    cluster = node.cluster_status()
    return web.json_response({
        "distributed_mode": node.cluster is not None,
        "fallback_mode": node.cluster is None or len(active) <= 1,
        "node_id": node.node_id,
        "role": cluster["role"],
        "leader_id": cluster.get("leader_id"),
        "term": cluster.get("term", 0),
        "degraded": cluster.get("degraded", False),
        "cluster_size": len(nodes),
        "data_dir": str(node.data_dir),
        "services": node.services(),
        "active_nodes": active,
        "scheduler_stats": {
            "in_flight": d.scheduler.total_in_flight(),
            "queue_depth": d.scheduler.queue_depth(),
            "max_queue": node.cfg.engine.max_queue,
            "num_parallel": node.cfg.engine.num_parallel,
            "num_parallel_auto": bool(getattr(node, "parallel_auto", False)),
            "requests_processed": d.requests_total,
        },
        "runner_stats": {
            "engine": node.engine.kind,
            "loaded_models": [m.name for m in node.engine.loaded()],
            "max_loaded_models": node.cfg.engine.max_loaded_models,
        },
        "integration_stats": {
            "tokens_generated": d.tokens_total,
            "models_available": len(await node.catalog_entries()),
            "uptime": int(time.time() - node.started_at),
        },
        "timestamp": now_iso(),
    })


async def nodes(request: web.Request) -> web.Response:
    return web.json_response({"nodes": _node(request).cluster_nodes(), "timestamp": now_iso()})


async def metrics(request: web.Request) -> web.Response:
    node = _node(request)
    d = node.dispatcher
    all_nodes = node.cluster_nodes()
    cluster = node.cluster_status()
    return web.json_response({
        "timestamp": now_iso(),
        "node_id": node.node_id,
        "connected_peers": cluster.get("peers_connected", 0),
        "is_leader": cluster["role"] == "leader",
        "requests_processed": d.requests_total,
        "tokens_generated": d.tokens_total,
        "in_flight": d.scheduler.total_in_flight(),
        "queue_depth": d.scheduler.queue_depth(),
        "models_loaded": len(node.engine.loaded()),
        "nodes_total": len(all_nodes),
        "nodes_online": sum(1 for n in all_nodes if n["status"] == "active"),
        "uptime": int(time.time() - node.started_at),
        "websocket_connections": node.websocket_connections,
        "version": __version__,
    })


async def models(request: web.Request) -> web.Response:
    return web.json_response({"models": await _node(request).cluster_models(), "timestamp": now_iso()})


async def replication_status(request: web.Request) -> web.Response:
    """Blob transfers in progress with bytes and rates, models being replicated, totals."""
    node = _node(request)
    if node.replicator is None:
        return web.json_response({"error": f"replication needs the cluster core and a model store "
                                  f"({node.p2p_reason or 'engine ' + node.engine.kind})"}, status=409)
    return web.json_response({**node.replicator.status(), "timestamp": now_iso()})


def _replicator(request: web.Request) -> Any:
    node = _node(request)
    if node.replicator is None:
        raise ConflictError(f"placement needs the cluster core and a model store "
                            f"({node.p2p_reason or 'engine ' + node.engine.kind})")
    return node.replicator


def _model(body: dict[str, Any]) -> str:
    return names.parse(field(body, "model", str, required=True)).short


async def rebalance(request: web.Request) -> web.Response:
    """Place every model (or `model`) anew, spread by bytes over the nodes that
    can hold it; copies move, then extra ones are dropped. `dry_run` only shows."""
    body = await read_json(request) if request.can_read_body else {}
    model = _model(body) if body.get("model") is not None else None
    result = await _replicator(request).rebalance(model, field(body, "dry_run", bool, False))
    return web.json_response({**result, "timestamp": now_iso()})


async def migrate(request: web.Request) -> web.Response:
    """Move `model`'s copy from node `from` to node `to`: `to` fetches it, then
    `from` drops its own. 202: the move is committed; replication/status shows it."""
    body = await read_json(request)
    model = _model(body)
    source = field(body, "from", str, required=True)
    target = field(body, "to", str, required=True)
    result = await _replicator(request).migrate(model, source, target)
    return web.json_response({**result, "status": "scheduled", "timestamp": now_iso()}, status=202)


async def placement_policy(request: web.Request) -> web.Response:
    """What one model wants: `replicas` (1..64, null: models.replicas) and
    `node_labels` (every one must match a node's node.labels)."""
    body = await read_json(request)
    model = _model(body)
    replicas = field(body, "replicas", int)
    if replicas is not None and not 1 <= replicas <= 64:
        raise BadRequestError("replicas must be between 1 and 64")
    labels = field(body, "node_labels", dict, {})
    if not all(isinstance(k, str) and k and isinstance(v, str) and len(k) + len(v) < 256
               for k, v in labels.items()) or len(labels) > 32:
        raise BadRequestError("node_labels must map at most 32 names to strings")
    result = await _replicator(request).set_policy(model, replicas, labels)
    return web.json_response({**result, "timestamp": now_iso()})


async def remove_node(request: web.Request) -> web.Response:
    """Remove a node that is down for good: it leaves the consensus membership,
    so it no longer counts toward a quorum; its models' copies are placed
    elsewhere once it has been down a few seconds anyway."""
    node = _node(request)
    if node.cluster is None:
        raise ConflictError(f"no cluster is running on this node ({node.p2p_reason})")
    node_id = request.match_info["node_id"]
    try:
        await node.cluster.remove_node(node_id)
    except RuntimeError as e:
        return web.json_response({"error": f"cannot remove node '{node_id}': {e}"}, status=503,
                                 headers={"Retry-After": "5"})
    return web.json_response({"removed": node_id, "timestamp": now_iso()})


async def drain_node(request: web.Request) -> web.Response:
    """Drain a node (this one, or any member by id or name) without stopping
    it: it takes nothing new, queued requests go to peers, running ones get
    node.drain_timeout_s to finish, then move. POST .../undrain ends it."""
    node = _node(request)
    action = request.path.rsplit("/", 1)[1]
    out = await node.control_node(request.match_info["node_id"], action)
    return web.json_response({**{k: v for k, v in out.items() if k != "done"}, "timestamp": now_iso()},
                             status=202 if action == "drain" else 200)


async def prometheus(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    node = _node(request)
    node.refresh_cluster_metrics()
    body = generate_latest(node.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def queue(request: web.Request) -> web.Response:
    """This node's queue: per model, the requests running and waiting, with
    their tenant, priority, position and age; and each tenant's counter."""
    return web.json_response({**_node(request).dispatcher.queue(), "timestamp": now_iso()})


async def token(request: web.Request) -> web.Response:
    """The join token admits nodes to the cluster: it is never served over HTTP
    (a DNS-rebound page could read it). The CLI reads it locally."""
    return web.json_response({"error": "the join token is not served over HTTP; run `ollama-distributed "
                              "cluster token` on the node (it reads the data dir or the admin socket)"},
                             status=410)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health)
    r.add_get("/health/live", live)
    r.add_get("/health/ready", ready)
    r.add_get("/api/distributed/status", status)
    r.add_get("/api/distributed/nodes", nodes)
    r.add_delete("/api/distributed/nodes/{node_id}", remove_node)
    r.add_post("/api/distributed/nodes/{node_id}/drain", drain_node)
    r.add_post("/api/distributed/nodes/{node_id}/undrain", drain_node)
    r.add_get("/api/distributed/metrics", metrics)
    r.add_get("/api/distributed/queue", queue)
    r.add_get("/api/distributed/models", models)
    r.add_get("/api/distributed/replication/status", replication_status)
    r.add_post("/api/distributed/rebalance", rebalance)
    r.add_post("/api/distributed/migrate", migrate)
    r.add_post("/api/distributed/placement", placement_policy)
    r.add_get("/metrics", prometheus)
    r.add_get("/api/distributed/token", token)
