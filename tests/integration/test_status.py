"""`status` and `nodes` against a real node, and against everything that is not one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pexpect
import psutil

from ..conftest import CLI, MODEL, NodeProc, free_port, start_node
from ..fakehttp import js, node_routes, serve


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr


def generate(node: NodeProc) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Say hi", "stream": False,
                       "options": {"num_predict": 4, "seed": 1}}).encode()
    req = urllib.request.Request(node.url + "/api/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert json.loads(r.read())["done"] is True


def test_status_basic(node: NodeProc) -> None:
    r = cli("status", "--api", node.url)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    node_id = node.get("/health")["node_id"]  # type: ignore[index]
    assert f"ID: {node_id}" in r.stdout
    assert "Overall Status: healthy" in r.stdout
    role = node.get("/api/distributed/status")["role"]  # type: ignore[index]
    assert role in ("standalone", "leader") and f"Role: {role}" in r.stdout
    assert "Uptime: " in r.stdout and "All systems operational" in r.stdout
    assert "\x1b[" not in r.stdout  # not a TTY: no colour


def test_status_json_schema_and_true_values(node: NodeProc) -> None:
    before = json.loads(cli("status", "--api", node.url, "--json", "--verbose").stdout)
    generate(node)
    r = cli("status", "--api", node.url, "--json", "--verbose")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["schema_version"] == 1 and data["status"] == "healthy" and data["api"] == node.url
    assert set(data) >= {"timestamp", "node", "cluster", "summary", "resources", "models", "services"}
    assert data["node"]["id"] == node.get("/health")["node_id"]  # type: ignore[index]
    assert data["node"]["role"] in ("standalone", "leader") and data["cluster"]["size"] == 1
    res = data["resources"]
    assert res["cpu_count"] == psutil.cpu_count()
    assert res["memory_total_bytes"] == psutil.virtual_memory().total
    assert res["disk_total_bytes"] == psutil.disk_usage(str(node.data_dir)).total
    model = {m["name"]: m for m in data["models"]}[MODEL]
    old = {m["name"]: m for m in before["models"]}[MODEL]
    assert model["requests"] == old["requests"] + 1
    assert model["loaded"] is True and model["size"] > 90_000_000
    assert [(n["id"], n["status"], n["local"]) for n in data["nodes"]] == [(data["node"]["id"], "active", True)]
    svc = data["services"]
    assert svc["api"]["port"] == node.api_port and svc["web"]["port"] == node.web_port
    assert svc["api"]["connections"] >= 1  # this very request


def test_status_verbose_text(node: NodeProc) -> None:
    r = cli("status", "--api", node.url, "--verbose")
    assert r.returncode == 0
    for needle in ("Resource Usage", "Cluster Nodes", "(this node): active", f"({psutil.cpu_count()} cores)", "Model Information", MODEL,
                   f"listening on :{node.api_port}/tcp", f"listening on :{node.web_port}/tcp", "P2P: "):
        assert needle in r.stdout, (needle, r.stdout)


def test_watch_redraws_and_ctrl_c_is_clean(node: NodeProc) -> None:
    p = subprocess.Popen([*CLI, "status", "--api", node.url, "--watch", "--interval", "0.3", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "NO_COLOR": "1"})
    assert p.stdout is not None
    stamps = []
    for _ in range(3):
        stamps.append(json.loads(p.stdout.readline())["timestamp"])
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=60)  # liveness: a loaded machine is slow to unwind
    assert p.returncode == 0 and "Traceback" not in err, err
    assert len(set(stamps)) == 3  # each refresh asked the node again


def test_watch_on_a_tty_redraws_in_place_with_colour(node: NodeProc) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    child = pexpect.spawn(CLI[0], [*CLI[1:], "status", "--api", node.url, "--watch", "--interval", "0.5"],
                          env=env, encoding="utf-8", timeout=90)
    child.expect("refreshing every")
    child.expect("\x1b\\[H\x1b\\[2J")  # the second frame starts by clearing the screen
    child.expect("refreshing every")
    assert "\x1b[32m" in (child.before or "")  # green "healthy"
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")


def test_no_color_on_a_tty() -> None:
    with serve(node_routes("node-fake")) as url:
        env = {**os.environ, "NO_COLOR": "1"}
        child = pexpect.spawn(CLI[0], [*CLI[1:], "status", "--api", url], env=env, encoding="utf-8",
                              timeout=30)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert "Overall Status: healthy" in (child.before or "")
        assert "\x1b[" not in (child.before or "")


def test_degraded_is_exit_1() -> None:
    with serve(node_routes("node-fake", status="degraded")) as url:
        r = cli("status", "--api", url)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Overall Status: degraded" in r.stdout and "troubleshoot" in r.stdout
        assert json.loads(cli("status", "--api", url, "--json").stdout)["status"] == "degraded"


def test_wrong_port_is_exit_2_naming_url_and_fix() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = cli("status", "--api", url)
    no_traceback(r)
    assert r.returncode == 2
    assert url in r.stderr and "ollama-distributed start" in r.stderr and "--api" in r.stderr
    data = json.loads(cli("status", "--api", url, "--json").stdout)
    assert data["status"] == "unreachable" and url in data["error"]


def test_not_a_node_and_garbage_json_are_exit_2() -> None:
    cases = {
        "html": ({}, None),
        "garbage": ({"/health": lambda: (200, "application/json", b"{not json at all")}, None),
        "other json": ({"/health": js({"hello": "world"})}, None),
        "a list": ({"/health": js([1, 2, 3])}, None),
    }
    for name, (routes, default) in cases.items():
        with serve(routes, default) as url:
            for cmd in (["status"], ["status", "--verbose"], ["nodes"]):
                r = cli(*cmd, "--api", url)
                no_traceback(r)
                assert r.returncode == 2, (name, cmd, r.stdout, r.stderr)
                assert url in r.stderr and "node" in r.stderr, (name, r.stderr)


def test_a_stopped_node_times_out_as_unreachable(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock")
    try:
        os.kill(n.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        t0 = time.monotonic()
        r = cli("status", "--api", n.url)
        assert time.monotonic() - t0 < 20
        no_traceback(r)
        assert r.returncode == 2 and n.url in r.stderr
    finally:
        os.kill(n.proc.pid, signal.SIGCONT)
        n.stop()
    r = cli("status", "--api", n.url)  # and once it is gone
    assert r.returncode == 2 and "Connection refused" in r.stderr


def test_nodes_table_and_json(node: NodeProc) -> None:
    node_id = node.get("/health")["node_id"]  # type: ignore[index]
    r = cli("nodes", "--api", node.url)
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:4] == ["ID", "NAME", "STATUS", "ROLE"]
    assert row.startswith(f"{node_id} *") and "active" in row and MODEL in row
    assert f"of {psutil.cpu_count()}" in row
    data = json.loads(cli("nodes", "--api", node.url, "--json").stdout)
    assert [n["id"] for n in data["nodes"]] == [node_id]
    assert data["nodes"][0]["resources"]["memory_total_bytes"] == psutil.virtual_memory().total


def test_a_node_with_auth_tokens(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", env={"OLLAMA_DISTRIBUTED_API_AUTH_TOKENS": "t0ken"})
    try:
        r = cli("status", "--api", n.url)
        no_traceback(r)
        assert r.returncode == 2 and "OLLAMA_DISTRIBUTED_API_TOKEN" in r.stderr
        ok = cli("status", "--api", n.url, "--verbose", env={"OLLAMA_DISTRIBUTED_API_TOKEN": "t0ken"})
        assert ok.returncode == 0 and "Overall Status: healthy" in ok.stdout
        nodes = cli("nodes", "--api", n.url, "--json", env={"OLLAMA_DISTRIBUTED_API_TOKEN": "t0ken"})
        assert nodes.returncode == 0 and json.loads(nodes.stdout)["nodes"]
        t = cli("troubleshoot", "--api", n.url, "--json")
        checks = {c["name"]: c for c in json.loads(t.stdout)["checks"]}
        assert t.returncode == 1 and "OLLAMA_DISTRIBUTED_API_TOKEN" in checks["Service reachable"]["fix"]
        # the playground on the web port asks for the same token
        req = urllib.request.Request(n.web_url + "/api/playground", method="POST",
                                     data=json.dumps({"model": MODEL, "prompt": "hi"}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("the playground answered without a token")
        except urllib.error.HTTPError as e:
            assert e.code == 401
        req.add_header("Authorization", "Bearer t0ken")
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read().splitlines()[-1])["done"] is True
    finally:
        n.stop()
