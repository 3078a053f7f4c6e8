"""The dashboard in headless Chromium (Debian's /usr/bin/chromium driven by
playwright): no console error, the node id shown, the chart moving, the
playground streaming a real answer from the real engine, user-supplied strings
shown as text and never run; plus the WebSocket surviving clients that vanish.
A screenshot lands in artifacts/dashboard.png."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import MODEL, REPO, NodeProc, start_node

CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="module")
def dash_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """A real node (llama.cpp) whose name is hostile HTML, as an operator could set it."""
    tmp = tmp_path_factory.mktemp("dash")
    n = start_node(tmp, env={"OLLAMA_DISTRIBUTED_NODE_NAME": HOSTILE})
    yield n
    n.stop()


def post(url: str, body: Any) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metrics(node: NodeProc) -> dict[str, Any]:
    return node.get("/api/distributed/metrics")  # type: ignore[return-value]


def test_dashboard_in_chromium(dash_node: NodeProc) -> None:
    if not os.path.exists(CHROMIUM):  # scripts/apt-deps.sh installs it; `make test` runs that first
        pytest.fail(f"{CHROMIUM} is missing: run scripts/apt-deps.sh (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    node_id = dash_node.get("/health")["node_id"]  # type: ignore[index]
    # A request whose model name is hostile HTML: it is refused, and lands in "recent requests".
    status, _ = post(dash_node.web_url + "/api/playground", {"model": HOSTILE, "prompt": "x"})
    assert status in (400, 404)
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            # Chromium reports a fetch body read to its end through getReader() as
            # ERR_ABORTED to the inspector; the page itself saw the whole answer
            # (data-state "done" below), so only other failures count.
            page.on("requestfailed", lambda r: None if r.url.endswith("/api/playground")
                    and r.failure == "net::ERR_ABORTED" else problems.append(f"request failed: {r.url} {r.failure}"))
            page.goto(dash_node.web_url + "/", wait_until="load")

            # live data over /ws: the node id and a healthy badge
            page.wait_for_function("id => document.getElementById('node-id').textContent === id", arg=node_id,
                                   timeout=15_000)
            assert page.text_content("#status") == "healthy"
            assert metrics(dash_node)["websocket_connections"] == 1

            # strings from users are shown as text, never parsed as HTML
            page.wait_for_function("t => document.querySelector('#recent tbody').textContent.includes(t)",
                                   arg=HOSTILE, timeout=10_000)
            assert HOSTILE in (page.text_content("#nodes tbody") or "")
            assert page.evaluate("document.querySelectorAll('main img').length") == 0
            assert page.evaluate("window.__pwned") is None

            # the chart samples every snapshot
            page.wait_for_function("() => Number(document.getElementById('chart').dataset.samples) >= 3",
                                   timeout=15_000)

            # the playground streams a real answer through the web port
            page.wait_for_function(f"() => [...document.querySelectorAll('#play-model option')].some(o => o.value === '{MODEL}')")
            page.select_option("#play-model", MODEL)
            page.fill("#play-prompt", "Name three colours of the rainbow.")
            page.fill("#play-max", "48")
            page.click("#play-send")
            page.wait_for_function("() => document.getElementById('answer').dataset.state !== 'streaming'",
                                   timeout=120_000)
            assert page.get_attribute("#answer", "data-state") == "done", page.text_content("#answer-stats")
            answer = page.text_content("#answer") or ""
            chunks = int(page.get_attribute("#answer", "data-chunks") or 0)
            assert len(answer.strip()) > 5 and chunks >= 5, (answer, chunks)
            assert "tokens at" in (page.text_content("#answer-stats") or "")

            # the tokens of that answer show on the chart, and in recent requests
            page.wait_for_function("() => Number(document.getElementById('chart').dataset.maxTps) > 0",
                                   timeout=10_000)
            page.wait_for_function("() => Number(document.getElementById('chart').dataset.maxRps) > 0",
                                   timeout=10_000)
            page.wait_for_function("() => document.querySelector('#recent tbody').textContent.includes('/playground')",
                                   timeout=10_000)
            assert page.evaluate(
                "(() => { const c = document.getElementById('chart'); const d = c.getContext('2d')"
                ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
                " for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })()") > 1000
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            page.close()
        finally:
            browser.close()
    assert not problems, problems
    deadline = time.monotonic() + 10
    while metrics(dash_node)["websocket_connections"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics(dash_node)["websocket_connections"] == 0


def test_websocket_survives_clients_that_vanish(dash_node: NodeProc) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    socks = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", dash_node.web_port), timeout=10)
        s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{dash_node.web_port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                  .encode())
        assert b"101 Switching Protocols" in s.recv(4096)
        socks.append(s)
    assert metrics(dash_node)["websocket_connections"] == 3
    for s in socks:  # gone without a close frame: a reset, as when a laptop lid shuts
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    deadline = time.monotonic() + 15
    while metrics(dash_node)["websocket_connections"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics(dash_node)["websocket_connections"] == 0
    with urllib.request.urlopen(dash_node.web_url + "/api/state", timeout=10) as r:
        assert json.loads(r.read())["health"]["status"] == "healthy"


@pytest.mark.parametrize(("body", "headers", "status"), [
    ({"model": MODEL, "prompt": "hi"}, {"Origin": "http://elsewhere.example"}, 403),
    ({"model": MODEL, "prompt": ""}, {}, 400),
    ({"model": MODEL, "prompt": "hi", "num_predict": 100000}, {}, 400),
    ({"model": "no-such-model", "prompt": "hi"}, {}, 404),
    ([1, 2], {}, 400),
])
def test_playground_refuses_bad_requests(dash_node: NodeProc, body: Any, headers: dict[str, str],
                                         status: int) -> None:
    req = urllib.request.Request(dash_node.web_url + "/api/playground", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **headers})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == status
    assert json.loads(e.value.read())["error"]


def state(node: NodeProc) -> dict[str, Any]:
    with urllib.request.urlopen(node.web_url + "/api/state", timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def test_playground_streams_ndjson(dash_node: NodeProc) -> None:
    before = state(dash_node)["text_chunks"]
    status, raw = post(dash_node.web_url + "/api/playground",
                       {"model": MODEL, "prompt": "Say hello.", "num_predict": 6})
    assert status == 200
    lines = [json.loads(line) for line in raw.splitlines()]
    assert all("text" in m for m in lines[:-1]) and len(lines) >= 3
    assert lines[-1]["done"] is True and 0 < lines[-1]["eval_count"] <= 6
    assert "context" not in lines[-1]
    assert state(dash_node)["text_chunks"] == before + len(lines) - 1  # the chart's live token count


def test_dashboard_page_headers(dash_node: NodeProc) -> None:
    with urllib.request.urlopen(dash_node.web_url + "/", timeout=10) as r:
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        html = r.read().decode()
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html  # values go in as text

