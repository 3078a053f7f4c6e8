"""Health and cluster endpoints carry the seed's fields with true values;
OpenAPI describes every route; bearer auth and the bind warning."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import ollama

from ..conftest import MODEL, NodeProc, start_node


def test_health_fields_are_true(node: NodeProc) -> None:
    h = node.get("/health")
    assert h["status"] == "healthy"  # type: ignore[index]
    assert h["node_id"] == (node.data_dir / "node_id").read_text().strip()  # type: ignore[index]
    s = h["services"]  # type: ignore[index]
    assert {"p2p", "p2p_peers", "consensus", "consensus_leader", "scheduler", "available_nodes"} <= set(s)
    assert s["available_nodes"] >= 1 and s["scheduler"] is True
    assert node.get("/health/live")["status"] == "alive"  # type: ignore[index]
    assert node.get("/health/ready")["status"] == "ready"  # type: ignore[index]


def test_distributed_endpoints_follow_the_node(node: NodeProc) -> None:
    before = node.get("/api/distributed/metrics")
    ollama.Client(host=node.url).generate(MODEL, "Hi", options={"num_predict": 2}, keep_alive="5m")
    after = node.get("/api/distributed/metrics")
    # the generate, and the read of `before` itself: every request on the API counts
    assert after["requests_processed"] == before["requests_processed"] + 2  # type: ignore[index]
    assert after["models_loaded"] == len(node.get("/api/ps")["models"]) >= 1  # type: ignore[index,arg-type]
    for key in ("timestamp", "node_id", "connected_peers", "is_leader", "nodes_total", "nodes_online",
                "uptime", "websocket_connections"):
        assert key in after  # type: ignore[operator]
    status = node.get("/api/distributed/status")
    assert status["cluster_size"] == len(status["active_nodes"]) >= 1  # type: ignore[index,arg-type]
    assert node.get("/health")["node_id"] in status["active_nodes"]  # type: ignore[index,operator]
    for key in ("distributed_mode", "fallback_mode", "scheduler_stats", "runner_stats", "integration_stats"):
        assert key in status  # type: ignore[operator]
    nodes = node.get("/api/distributed/nodes")["nodes"]  # type: ignore[index]
    me = next(n for n in nodes if n["local"])  # type: ignore[union-attr]
    assert me["status"] == "active" and MODEL in me["models"] and MODEL in me["loaded_models"]
    assert 0 <= me["resources"]["cpu"] <= 1 and 0 < me["resources"]["memory"] < 1
    assert me["resources"]["memory_total_bytes"] > 0 and me["resources"]["disk_total_bytes"] > 0
    models = node.get("/api/distributed/models")["models"]  # type: ignore[index]
    smol = next(m for m in models if m["name"] == MODEL)  # type: ignore[union-attr]
    assert me["id"] in smol["nodes"] and me["id"] in smol["loaded_on"]


def test_prometheus_text(node: NodeProc) -> None:
    with urllib.request.urlopen(node.url + "/metrics") as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert "ollama_distributed_requests_total{" in text
    assert "ollama_distributed_build_info{" in text


def test_openapi_describes_every_route(node: NodeProc) -> None:
    spec = node.get("/api/openapi.json")
    paths = spec["paths"]  # type: ignore[index]
    for p in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show", "/api/create",
              "/api/copy", "/api/delete", "/api/pull", "/api/push", "/api/tags", "/api/ps", "/api/version",
              "/api/blobs/{digest}", "/", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
              "/v1/models", "/v1/models/{model}", "/health", "/health/live", "/health/ready",
              "/api/distributed/status", "/api/distributed/nodes", "/api/distributed/metrics",
              "/api/distributed/models", "/api/distributed/replication/status", "/metrics",
              "/api/openapi.json"):
        assert p in paths, p
    assert spec["openapi"].startswith("3.")  # type: ignore[index]


def test_root_says_ollama_is_running(node: NodeProc) -> None:
    with urllib.request.urlopen(node.url + "/") as r:
        assert r.read() == b"Ollama is running"
    with urllib.request.urlopen(urllib.request.Request(node.url + "/", method="HEAD")) as r:
        assert r.status == 200


def _status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_auth_tokens_and_bind_warning(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"api": {"host": "127.0.0.2", "auth_tokens": ["s3cret"]}}))
    n = start_node(tmp_path, "--config", str(cfg), "--engine", "mock", host="127.0.0.2")
    n_url = n.url
    try:
        assert _status(n_url + "/api/tags") == 401
        assert _status(n_url + "/api/tags", "wrong") == 401
        assert _status(n_url + "/api/tags", "s3cret") == 200
        assert _status(n_url + "/health/live") == 200  # probes stay open
        assert "without API keys" not in n.log()
    finally:
        n.stop()
    cfg.write_text(json.dumps({"api": {"host": "0.0.0.0"}}))  # every interface, no key: warned
    n = start_node(tmp_path, "--config", str(cfg), "--engine", "mock", wait=False)
    try:
        deadline = time.monotonic() + 30
        while "without API keys" not in n.log():
            assert time.monotonic() < deadline, n.log()
            time.sleep(0.1)
    finally:
        n.stop()
