"""The doors of the HTTP ports, through real node processes and real headers:
Origin (CSRF), Host (DNS rebinding), the join token kept off HTTP, secrets kept
out of `config show` and the log, API keys with roles and limits, the
dashboard's key and WebSocket cap, per-request templates, and --p2p-host.
Nodes run the mock engine: these are rules about the doors, not the model."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ..conftest import CLI, MODEL, NodeProc, start_node

EVIL = "http://evil.example"


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with exactly these headers (Host included when given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hdrs = dict(headers or {})
        conn.putrequest(method, path, skip_host="Host" in hdrs, skip_accept_encoding=True)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k: v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})


def tags(node: NodeProc, key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, _, body = request(node.api_port, "GET", "/api/tags", headers=headers)
    assert status == 200, body
    return [m["name"] for m in json.loads(body)["models"]]


@pytest.fixture(scope="module")
def open_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """A node without keys; cors_origins lets one extra page in."""
    tmp = tmp_path_factory.mktemp("doors")
    cfg = tmp / "c.yaml"
    cfg.write_text(json.dumps({"api": {"cors_origins": ["https://app.example"]}}))
    n = start_node(tmp, "--config", str(cfg), "--engine", "mock")
    yield n
    n.stop()


# ---- Origin ---------------------------------------------------------------------------


def test_a_foreign_origin_changes_nothing(open_node: NodeProc) -> None:
    """The reported attack: a text/plain POST from a web page to /api/copy."""
    body = json.dumps({"source": MODEL, "destination": "stolen:latest"}).encode()
    status, _, out = request(open_node.api_port, "POST", "/api/copy", body,
                             {"Content-Type": "text/plain", "Origin": EVIL})
    assert status == 403, out
    assert "api.cors_origins" in json.loads(out)["error"]
    assert "stolen:latest" not in tags(open_node)
    # the same request without Origin (curl, SDKs) works, with any Content-Type
    status, _, out = request(open_node.api_port, "POST", "/api/copy", body, {"Content-Type": "text/plain"})
    assert status == 200, out
    assert "stolen:latest" in tags(open_node)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/api/tags", None),
    ("GET", "/", None),
    ("GET", "/health", None),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    ("DELETE", "/api/delete", {"model": "nothing:here"}),
    ("OPTIONS", "/api/tags", None),
    ("GET", "/no/such/path", None),
])
def test_every_method_and_path_refuses_a_foreign_origin(open_node: NodeProc, method: str, path: str,
                                                        body: Any) -> None:
    data = json.dumps(body).encode() if body is not None else None
    status, headers, out = request(open_node.api_port, method, path, data,
                                   {"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert status == 403, out
    assert "Access-Control-Allow-Origin" not in headers
    err = json.loads(out)["error"]
    assert (err["message"] if path.startswith("/v1/") else err).startswith("origin 'http://evil.example'")


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://127.0.0.1", "https://[::1]:8443",
                                    "https://app.example"])
def test_allowed_origins_get_cors_answers(open_node: NodeProc, origin: str) -> None:
    status, headers, _ = request(open_node.api_port, "OPTIONS", "/api/chat",
                                 headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in headers["Access-Control-Allow-Methods"]
    status, headers, out = request(open_node.api_port, "GET", "/api/tags", headers={"Origin": origin})
    assert status == 200, out
    assert headers["Access-Control-Allow-Origin"] == origin


def test_dashboard_refuses_a_foreign_origin(open_node: NodeProc) -> None:
    for method, path in (("GET", "/api/state"), ("GET", "/ws"), ("POST", "/api/playground")):
        status, _, out = request(open_node.web_port, method, path, b"{}" if method == "POST" else None,
                                 {"Origin": EVIL, "Connection": "Upgrade", "Upgrade": "websocket",
                                  "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert status == 403, (path, out)
    status, _, out = request(open_node.web_port, "GET", "/api/state",
                             headers={"Origin": f"http://localhost:{open_node.web_port}"})
    assert status == 200 and json.loads(out)["health"]["status"] == "healthy"


# ---- Host -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "10.1.2.3", "[fe80::1]:80"])
def test_loopback_bind_refuses_other_host_names(open_node: NodeProc, host: str) -> None:
    for port, path in ((open_node.api_port, "/api/tags"), (open_node.api_port, "/api/distributed/token"),
                       (open_node.web_port, "/api/state")):
        status, _, out = request(port, "GET", path, headers={"Host": host})
        assert status == 403, (port, path, out)
        assert "api.allowed_hosts" in json.loads(out)["error"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080", "app.localhost"])
def test_loopback_names_pass(open_node: NodeProc, host: str) -> None:
    status, _, _ = request(open_node.api_port, "GET", "/api/version", headers={"Host": host})
    assert status == 200


def test_allowed_hosts_extends_the_loopback_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"api": {"allowed_hosts": ["llm.internal"]}}))
    n = start_node(tmp_path, "--config", str(cfg), "--engine", "mock", "--log-level", "warning")
    try:
        assert request(n.api_port, "GET", "/api/tags", headers={"Host": "llm.internal:8080"})[0] == 200
        assert request(n.api_port, "GET", "/api/tags", headers={"Host": "other.internal"})[0] == 403
        # the node's own origins: its names on its own ports (the dashboard's page calling the API)
        own = f"http://llm.internal:{n.web_port}"
        status, headers, _ = request(n.api_port, "GET", "/api/tags", headers={"Origin": own})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == own
        status, _, _ = request(n.api_port, "GET", "/api/tags", headers={"Origin": "http://llm.internal:1"})
        assert status == 403  # the same name on a port that is not this node's
    finally:
        n.stop()


def test_sighup_reloads_the_origins_and_hosts(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"logging": {"level": "info"}}))
    n = start_node(tmp_path, "--config", str(cfg), "--engine", "mock")
    try:
        page = {"Origin": "https://app.example"}
        assert request(n.api_port, "GET", "/api/tags", headers=page)[0] == 403
        assert request(n.web_port, "GET", "/api/state", headers={"Host": "llm.internal"})[0] == 403
        cfg.write_text(json.dumps({"api": {"cors_origins": ["https://app.example"],
                                           "allowed_hosts": ["llm.internal"]}}))
        n.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while request(n.api_port, "GET", "/api/tags", headers=page)[0] != 200:
            assert time.monotonic() < deadline, n.log()
            time.sleep(0.1)
        assert request(n.web_port, "GET", "/api/state", headers={"Host": "llm.internal"})[0] == 200
    finally:
        n.stop()


# ---- the join token and other secrets -------------------------------------------------


def test_the_join_token_is_not_served_over_http(open_node: NodeProc) -> None:
    token = cli("cluster", "token", "--data-dir", str(open_node.data_dir))
    assert token.returncode == 0, token.stderr
    value = token.stdout.strip()
    assert re.fullmatch(r"OD1:[0-9a-f]{64}:\S+", value)
    status, _, out = request(open_node.api_port, "GET", "/api/distributed/token")
    assert status == 410 and value.encode() not in out
    assert "cluster token" in json.loads(out)["error"]
    # it came over the admin socket, which only this user can open
    sock = open_node.data_dir / "admin.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert value not in open_node.log()


def test_the_cli_finds_the_node_without_flags(tmp_path: Path) -> None:
    """As an operator types it: no --data-dir, the node in the default data dir."""
    home = {"HOME": str(tmp_path)}
    n = start_node(tmp_path, "--engine", "mock", "--log-level", "warning", env=home,
                   data_dir=tmp_path / ".ollama-distributed")
    try:
        token = cli("cluster", "token", env=home)
        assert token.returncode == 0 and token.stdout.startswith("OD1:"), token.stderr
        key = cli("keys", "create", "first", "--role", "admin", env=home)
        assert key.returncode == 0, key.stderr
        assert request(n.api_port, "GET", "/api/tags", headers=bearer(key.stdout.strip()))[0] == 200
        assert request(n.api_port, "GET", "/api/tags")[0] == 401
    finally:
        n.stop()
    gone = cli("keys", "list", env=home)  # stopped: the keys are in the Raft state, not listed offline
    assert gone.returncode == 0 and "not running" in gone.stderr and "No API keys" not in gone.stdout


def test_config_show_redacts_tokens(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    secret_token = "OD1:" + "ab" * 32 + ":verysecret"
    cfg.write_text(json.dumps({"api": {"auth_tokens": ["hunter2-admin"]}, "p2p": {"token": secret_token}}))
    for args in (["config", "show", "--config", str(cfg)], ["config", "show", "--config", str(cfg), "--json"]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert "hunter2-admin" not in r.stdout and "verysecret" not in r.stdout
        assert "<redacted>" in r.stdout


def test_token_file_env_and_the_ps_warning(tmp_path: Path) -> None:
    """--token-file and $OLLAMA_DISTRIBUTED_TOKEN carry the token; --token
    still works but warns that `ps` shows it. Each is proved by the seed
    refusing a wrong token: the value really reached the join."""
    for d in ("a", "j0", "j1", "j2"):
        (tmp_path / d).mkdir()
    seed = start_node(tmp_path / "a", "--engine", "mock", "--log-level", "warning")
    try:
        wrong = cli("cluster", "token", "--data-dir", str(seed.data_dir)).stdout.strip()[:-4] + "xxxx"
        join = ["--join", f"127.0.0.1:{seed.p2p_port}", "--engine", "mock"]
        token_file = tmp_path / "token"
        token_file.write_text(wrong + "\n")
        for i, (args, env) in enumerate(((["--token-file", str(token_file)], {}),
                                         ([], {"OLLAMA_DISTRIBUTED_TOKEN": wrong}),
                                         (["--token", wrong], {}))):
            n = start_node(tmp_path / f"j{i}", *join, *args, env=env, wait=False)
            assert n.proc.wait(60) == 78, n.log()
            log = n.log()
            assert "refused to let this node join" in log, log
            assert wrong not in log and "xxxx" not in log.replace("OD1:<redacted>", "")
            assert ("shows the join token" in log) == ("--token" in args), log
    finally:
        seed.stop()


# ---- API keys -------------------------------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_key(node: NodeProc, name: str, *args: str) -> str:
    r = cli("keys", "create", name, *args, "--data-dir", str(node.data_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"odk_[A-Za-z0-9_-]{43}", lines[0]), r.stdout
    return lines[0]


def gen(port: int, headers: dict[str, str], path: str = "/api/generate") -> tuple[int, dict[str, str], Any]:
    if path.startswith("/v1/"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    else:
        body = {"model": MODEL, "prompt": "hi", "stream": False}
    status, h, out = request(port, "POST", path, json.dumps(body).encode(),
                             {"Content-Type": "application/json", **headers})
    return status, h, json.loads(out)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    tmp = tmp_path_factory.mktemp("keys")
    n = start_node(tmp, "--engine", "mock", env={"OLLAMA_DISTRIBUTED_WEB_MAX_CLIENTS": "2"})
    yield n
    n.stop()


def test_keys_roles_and_revocation(keyed: NodeProc) -> None:
    port = keyed.api_port
    assert request(port, "GET", "/api/tags")[0] == 200  # no key yet: open, as before
    admin = create_key(keyed, "ops", "--role", "admin")
    user = create_key(keyed, "app")

    status, headers, out = request(port, "GET", "/api/tags")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "keys create" in json.loads(out)["error"]
    assert request(port, "GET", "/api/tags", headers=bearer(admin[:-1] + "x"))[0] == 401
    status, headers, out = request(port, "GET", "/v1/models")
    assert status == 401 and json.loads(out)["error"]["code"] == "invalid_api_key"
    messages = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    status, _, out = request(port, "POST", "/v1/messages", messages.encode(), {"Content-Type": "application/json"})
    assert status == 401 and json.loads(out)["error"]["type"] == "authentication_error"  # Anthropic's shape
    status, _, out = request(port, "POST", "/v1/messages", messages.encode(),
                             {"Content-Type": "application/json", "x-api-key": user})
    assert status == 200 and json.loads(out)["type"] == "message", out
    for path in ("/health", "/health/live", "/health/ready", "/"):
        assert request(port, "GET", path)[0] == 200, path

    assert request(port, "GET", "/api/tags", headers=bearer(admin))[0] == 200
    assert request(port, "GET", "/api/tags", headers={"x-api-key": user})[0] == 200  # Anthropic's header
    assert gen(port, bearer(user))[0] == 200
    assert gen(port, bearer(user), "/v1/chat/completions")[0] == 200
    assert request(port, "GET", "/api/distributed/nodes", headers=bearer(user))[0] == 200
    copy = json.dumps({"source": MODEL, "destination": "mine:latest"}).encode()
    status, _, out = request(port, "POST", "/api/copy", copy, bearer(user))
    assert status == 403 and "admin" in json.loads(out)["error"]
    status, _, out = request(port, "POST", "/api/distributed/rebalance", b"{}", bearer(user))
    assert status == 403
    assert "mine:latest" not in tags(keyed, admin)
    assert request(port, "POST", "/api/copy", copy, bearer(admin))[0] == 200

    listed = cli("keys", "list", "--json", "--data-dir", str(keyed.data_dir))
    assert listed.returncode == 0, listed.stderr
    rows = {k["name"]: k for k in json.loads(listed.stdout)["keys"]}
    assert rows["ops"]["role"] == "admin" and rows["app"]["role"] == "user"
    assert rows["app"]["last_used"] and rows["app"]["created"]
    assert admin not in listed.stdout and user not in listed.stdout and "hash" not in listed.stdout
    table = cli("keys", "list", "--data-dir", str(keyed.data_dir)).stdout
    assert "ops" in table and "admin" in table and user not in table

    metrics = request(port, "GET", "/metrics", headers=bearer(user))[2].decode()
    assert re.search(r'ollama_distributed_auth_requests_total\{key="app",outcome="forbidden"\} [1-9]', metrics)
    assert re.search(r'ollama_distributed_auth_requests_total\{key="-",outcome="unauthorized"\} [1-9]', metrics)
    assert user not in metrics and admin not in metrics

    assert cli("keys", "revoke", "app", "--data-dir", str(keyed.data_dir)).returncode == 0
    t0 = time.monotonic()
    assert request(port, "GET", "/api/tags", headers=bearer(user))[0] == 401
    assert time.monotonic() - t0 < 1.0
    again = cli("keys", "revoke", "app", "--data-dir", str(keyed.data_dir))
    assert again.returncode == 1 and "no key named 'app'" in again.stderr
    dup = cli("keys", "create", "ops", "--data-dir", str(keyed.data_dir))
    assert dup.returncode == 1 and "exists" in dup.stderr
    assert user not in keyed.log() and admin not in keyed.log()


def test_rate_limits(keyed: NodeProc) -> None:
    port = keyed.api_port
    rpm = create_key(keyed, "slow", "--rpm", "3")
    for _ in range(3):
        assert request(port, "GET", "/api/tags", headers=bearer(rpm))[0] == 200
    status, headers, out = request(port, "GET", "/api/tags", headers=bearer(rpm))
    assert status == 429
    assert int(headers["Retry-After"]) >= 1 and headers["Retry-After"].isdigit()
    assert "rate limit" in json.loads(out)["error"]
    status, headers, out = request(port, "GET", "/v1/models", headers=bearer(rpm))
    assert status == 429 and headers["Retry-After"].isdigit()
    err = json.loads(out)["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == "rate_limit_exceeded"

    # tokens per minute: the mock engine answers 16 tokens, so the first
    # request spends the bucket and the next waits for it to refill
    tpm = create_key(keyed, "chatty", "--tpm", "20")
    status, _, out = gen(port, bearer(tpm))
    assert status == 200 and out["eval_count"] + out["prompt_eval_count"] > 20 - 16
    status, headers, out = gen(port, bearer(tpm))
    if status == 200:  # 16 + prompt tokens may leave a sliver: one more spends it
        status, headers, out = gen(port, bearer(tpm))
    assert status == 429 and int(headers["Retry-After"]) >= 1, out
    reader = create_key(keyed, "reader")
    metrics = request(port, "GET", "/metrics", headers=bearer(reader))[2].decode()
    assert re.search(r'auth_requests_total\{key="slow",outcome="rate_limited"\} 2\.0', metrics), metrics
    assert re.search(r'auth_requests_total\{key="slow",outcome="ok"\} 3\.0', metrics), metrics


def ws_connect(port: int, protocols: tuple[str, ...] = (), origin: str | None = None) -> tuple[int, Any]:
    """Open /ws; (101, first snapshot) or (status, None)."""
    import aiohttp

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:
            try:
                headers = {"Origin": origin} if origin else {}
                async with s.ws_connect(f"http://127.0.0.1:{port}/ws", protocols=protocols,
                                        headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                    msg = await asyncio.wait_for(ws.receive_json(), 10)
                    return 101, msg
            except aiohttp.WSServerHandshakeError as e:
                return e.status, None

    return asyncio.run(go())


def test_dashboard_needs_the_key(keyed: NodeProc) -> None:
    key = create_key(keyed, "viewer")
    web = keyed.web_port
    assert request(web, "GET", "/")[0] == 200  # the page itself, which asks for the key
    assert request(web, "GET", "/api/state")[0] == 401
    status, _, out = request(web, "GET", "/api/state", headers=bearer(key))
    assert status == 200 and json.loads(out)["auth_required"] is True
    assert ws_connect(web)[0] == 401
    assert ws_connect(web, ("bearer.odk_wrong",))[0] == 401
    status, snap = ws_connect(web, (f"bearer.{key}",), origin=f"http://localhost:{web}")
    assert status == 101 and snap["health"]["node_id"]
    body = json.dumps({"model": MODEL, "prompt": "hi", "num_predict": 2}).encode()
    assert request(web, "POST", "/api/playground", body, {"Content-Type": "application/json"})[0] == 401
    status, _, out = request(web, "POST", "/api/playground", body,
                             {"Content-Type": "application/json", **bearer(key)})
    assert status == 200 and json.loads(out.splitlines()[-1])["done"]


def test_websocket_client_cap(keyed: NodeProc) -> None:
    import aiohttp

    key = create_key(keyed, "watcher")

    async def go() -> int:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{keyed.web_port}/ws"
            held = [await s.ws_connect(url, protocols=(f"bearer.{key}",)) for _ in range(2)]
            try:
                await s.ws_connect(url, protocols=(f"bearer.{key}",))
            except aiohttp.WSServerHandshakeError as e:
                return e.status
            finally:
                for w in held:
                    await w.close()
            return 101

    assert asyncio.run(go()) == 503  # web.max_clients is 2 on this node


def test_keys_made_while_the_node_is_down(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    r = cli("keys", "create", "early", "--role", "admin", "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    stored = data / "keys.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert key not in stored.read_text()  # only its sha256
    n = start_node(tmp_path, "--engine", "mock", data_dir=data)
    try:
        assert request(n.api_port, "GET", "/api/tags")[0] == 401
        assert request(n.api_port, "GET", "/api/tags", headers=bearer(key))[0] == 200
        # the node moved it into the cluster's state; the file keeps none
        assert json.loads(stored.read_text())["keys"] == {}
    finally:
        n.stop()


def test_keys_on_a_node_without_a_cluster(tmp_path: Path) -> None:
    """p2p disabled: the keys live in <data dir>/keys.json, through the same socket."""
    n = start_node(tmp_path, "--engine", "mock", "--log-level", "warning",
                   env={"OLLAMA_DISTRIBUTED_P2P_ENABLED": "false"})
    try:
        key = create_key(n, "solo", "--role", "admin")
        assert request(n.api_port, "GET", "/api/tags")[0] == 401
        assert request(n.api_port, "GET", "/api/tags", headers=bearer(key))[0] == 200
        stored = json.loads((n.data_dir / "keys.json").read_text())["keys"]
        assert list(stored) == ["solo"] and key not in json.dumps(stored)
        r = cli("keys", "revoke", "solo", "--data-dir", str(n.data_dir))
        assert r.returncode == 0 and "open again" in r.stderr, r.stderr
        assert request(n.api_port, "GET", "/api/tags")[0] == 200
    finally:
        n.stop()


# ---- templates and the P2P bind --------------------------------------------------------


def test_request_templates_capped_or_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"api": {"max_template_bytes": 100}}))
    n = start_node(tmp_path, "--config", str(cfg), "--engine", "mock", "--log-level", "warning")
    try:
        def go(template: str) -> tuple[int, Any]:
            body = {"model": MODEL, "prompt": "hi", "stream": False, "template": template}
            status, _, out = request(n.api_port, "POST", "/api/generate", json.dumps(body).encode())
            return status, json.loads(out)
        assert go("{{ .Prompt }}")[0] == 200
        status, out = go("{{ .Prompt }}" + "x" * 200)
        assert status == 400 and "api.max_template_bytes" in out["error"]
        # Jinja loops make a few bytes render for hours: refused in a request
        status, out = go("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}")
        assert status == 400 and "Go template syntax" in out["error"]
    finally:
        n.stop()
    cfg.write_text(json.dumps({"api": {"allow_request_templates": False}}))
    n = start_node(tmp_path, "--config", str(cfg), "--engine", "mock", "--log-level", "warning")
    try:
        body = {"model": MODEL, "prompt": "hi", "stream": False, "template": "{{ .Prompt }}"}
        status, _, out = request(n.api_port, "POST", "/api/generate", json.dumps(body).encode())
        assert status == 400 and "api.allow_request_templates" in json.loads(out)["error"]
    finally:
        n.stop()


def test_p2p_host(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", "--p2p-host", "127.0.0.1", "--log-level", "warning")
    try:
        banner = n.log()
        assert f"P2P:    quic://127.0.0.1:{n.p2p_port}" in banner and "all interfaces" not in banner
        udp = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(n.proc.pid).net_connections(kind="udp")}
        assert ("127.0.0.1", n.p2p_port) in udp, udp
    finally:
        n.stop()
    n = start_node(tmp_path, "--engine", "mock", "--log-level", "warning", data_dir=tmp_path / "d2")
    try:
        assert f"P2P:    quic://0.0.0.0:{n.p2p_port} (all interfaces" in n.log()
    finally:
        n.stop()


def test_the_dashboard_in_chromium_asks_for_the_key(tmp_path: Path) -> None:
    """The page on a keyed node: it says a key is needed, takes one in the API
    key field, keeps it in sessionStorage (a reload needs no retyping), goes
    live over /ws and streams a playground answer."""
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.fail(f"{chromium} is missing: run scripts/apt-deps.sh (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    n = start_node(tmp_path, "--engine", "mock", "--log-level", "warning")
    try:
        key = create_key(n, "browser")
        node_id = json.loads(request(n.api_port, "GET", "/health")[2])["node_id"]
        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{n.web_port}/", wait_until="load")
                page.wait_for_function("() => document.getElementById('status').textContent === 'key needed'",
                                       timeout=15_000)
                assert page.is_visible("#play-token")
                assert page.text_content("#node-id") == "?"  # nothing shown without the key
                page.fill("#play-token", key)
                page.dispatch_event("#play-token", "change")
                live = "() => document.getElementById('conn').textContent === 'live updates: on'"
                page.wait_for_function(live, timeout=15_000)
                page.wait_for_function(f"() => document.getElementById('node-id').textContent === {node_id!r}",
                                       timeout=15_000)
                page.reload(wait_until="load")  # the tab keeps the key
                page.wait_for_function(live, timeout=15_000)
                page.select_option("#play-model", MODEL)
                page.fill("#play-prompt", "hi")
                page.click("#play-send")
                page.wait_for_function("() => document.getElementById('answer').dataset.state === 'done'",
                                       timeout=30_000)
                assert int(page.get_attribute("#answer", "data-chunks") or 0) > 0
            finally:
                browser.close()
        assert not errors, errors
    finally:
        n.stop()
