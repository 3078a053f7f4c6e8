"""Pieces of `status`, `nodes` and `troubleshoot` that need no node: rendering,
colour rules, port probing, clock reading, and robustness to partial data."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
from click.testing import CliRunner
from ollama_distributed.cli import nodes, status, troubleshoot

from ..fakehttp import node_routes, serve


def sample(state: str = "healthy", verbose: bool = False) -> dict:
    data = {
        "schema_version": 1, "api": "http://127.0.0.1:1", "status": state, "timestamp": "2026-01-02T03:04:05Z",
        "node": {"id": "node-1", "status": state, "role": "leader", "version": "0.1.0", "engine": "mock",
                 "uptime_seconds": 3725},
        "cluster": {"size": 1, "active_nodes": ["node-1"], "leader_id": "node-1", "peers_connected": 0},
        "summary": "x",
    }
    if verbose:
        data |= {
            "resources": {"cpu_percent": 12.5, "cpu_count": 2, "memory_used_bytes": 2e9,
                          "memory_total_bytes": 8e9, "memory_percent": 25.0, "disk_used_bytes": 1e9,
                          "disk_total_bytes": 1e10, "disk_percent": 10.0},
            "models": [{"name": "a:1", "size": 2e9, "loaded": True, "requests": 45},
                       {"name": "b:2", "size": 7e9, "loaded": False, "requests": 0}],
            "services": {"api": {"url": "http://localhost:8080", "port": 8080, "protocol": "tcp",
                                 "connections": 3}, "web": None, "p2p": None},
        }
    return data


def test_render_basic_and_verbose() -> None:
    text = status.render(sample(verbose=True), color=False)
    for needle in ("✅ Overall Status: healthy", "Timestamp: 2026-01-02 03:04:05 UTC", "ID: node-1",
                   "Role: leader", "Uptime: 1h 2m", "CPU: 12.5% (2 cores)", "Memory: 25.0% (2.0 GB / 8.0 GB)",
                   "🟢 a:1 (2.0 GB, loaded) - 45 requests", "📦 b:2 (7.0 GB, not loaded) - 0 requests",
                   "API: listening on :8080/tcp", "3 connection(s)", "Web: not running",
                   "All systems operational"):
        assert needle in text, needle
    assert "\x1b[" not in text
    assert "\x1b[" in status.render(sample(), color=True)


def test_render_degraded_points_at_troubleshoot() -> None:
    text = status.render(sample("degraded"), color=False)
    assert "Overall Status: degraded" in text and "troubleshoot" in text
    assert "All systems operational" not in text


def test_exit_codes_from_a_fake_node() -> None:
    runner = CliRunner()
    for state, code in (("healthy", 0), ("degraded", 1), ("unhealthy", 1)):
        with serve(node_routes("node-x", status=state)) as url:
            r = runner.invoke(status.status, ["--api", url])
            assert r.exit_code == code, (state, r.output)
            assert r.exception is None or isinstance(r.exception, SystemExit)


def test_nodes_rows_tolerate_partial_data() -> None:
    rows = nodes.rows([{"id": "a", "local": True, "resources": {"cpu": 0.5, "cpu_count": 4}},
                       {"id": "b"}, {}])
    assert rows[0][0] == "a *" and rows[0][5] == "50% of 4" and rows[0][6] == "-"
    assert rows[1][5] == "-" and rows[2][0] == "?"
    assert nodes.table(rows, nodes.HEADERS, color=False).splitlines()[0].startswith("ID")


def test_port_probe_and_holder() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not troubleshoot._port_free("127.0.0.1", port, "tcp")
        assert f"pid {os.getpid()}" in troubleshoot._holder(port, "tcp")
    assert troubleshoot._port_free("127.0.0.1", port, "tcp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", 0))
        uport = u.getsockname()[1]
        assert not troubleshoot._port_free("127.0.0.1", uport, "udp")


def test_clock_reading() -> None:
    with serve(node_routes("node-z", clock_offset=-42.0)) as url:
        skew, rtt = troubleshoot._clock(url)
    assert -42.5 < skew < -41.5 and 0 <= rtt < 1


def test_unhealthy_node_answers_503_and_is_exit_1() -> None:
    routes = node_routes("node-sick")
    body = json.dumps({"status": "unhealthy", "node_id": "node-sick", "timestamp": "2026-01-01T00:00:00Z"})
    routes["/health"] = lambda: (503, "application/json", body.encode())
    with serve(routes) as url:
        r = CliRunner().invoke(status.status, ["--api", url])
        assert r.exit_code == 1, r.output
        assert "Overall Status: unhealthy" in r.output
        t = CliRunner().invoke(troubleshoot.troubleshoot, ["--api", url, "--json"])
        assert t.exit_code == 1
        service = json.loads(t.output)["checks"][0]
        assert service["status"] == "fail" and "unhealthy" in service["detail"] and "journalctl" in service["fix"]


@pytest.mark.parametrize("url", ["not a url", "http://[::1", "ftp://127.0.0.1:1", "http://127.0.0.1:99999", ""])
@pytest.mark.parametrize("command", [status.status, nodes.nodes, troubleshoot.troubleshoot])
def test_unusable_api_urls_are_exit_2_without_traceback(command: Any, url: str) -> None:
    r = CliRunner().invoke(command, ["--api", url])
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit)  # not an uncaught error
    assert "is not a usable URL" in r.output and "http://127.0.0.1:8080" in r.output
