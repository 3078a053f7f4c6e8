"""The dashboard in headless Chromium (Debian's /usr/bin/chromium driven by
playwright): no console error, the node id shown, the chart moving, the
playground streaming a real answer from the real engine, each model's placement
(copies held against the count wanted, holders, assigned nodes, why a copy is
unplaced) as the API has it, the transfers panel, user-supplied strings shown
as text and never run; plus the WebSocket surviving clients that vanish.
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
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..conftest import MODEL, REPO, NodeProc, start_node

if TYPE_CHECKING:
    from playwright.sync_api import Page

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


@contextmanager
def dashboard(node: NodeProc) -> Iterator[tuple[Page, list[str]]]:
    """The node's dashboard in headless Chromium, live; with the console errors,
    warnings, page errors and failed requests seen, which must stay empty."""
    if not os.path.exists(CHROMIUM):  # scripts/apt-deps.sh installs it; `make test` runs that first
        pytest.fail(f"{CHROMIUM} is missing: run scripts/apt-deps.sh (Debian's chromium package)")
    from playwright.sync_api import sync_playwright

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
            page.goto(node.web_url + "/", wait_until="load")
            page.wait_for_function("() => document.getElementById('conn').textContent === 'live updates: on'",
                                   timeout=15_000)
            yield page, problems
            page.close()
        finally:
            browser.close()


# The cells of a model's row in the models table, by column title, as shown.
MODEL_ROW = """name => {
  const heads = [...document.querySelectorAll('#models thead th')];
  const row = [...document.querySelectorAll('#models tbody tr')]
    .find(tr => tr.cells[0] && tr.cells[0].textContent === name);
  if (!row) return null;
  const out = {};
  heads.forEach((th, i) => { out[th.textContent] = {text: row.cells[i].textContent,
                                                    shown: row.cells[i].offsetParent !== null}; });
  return out;
}"""
HEAD_SHOWN = "t => [...document.querySelectorAll('#models thead th')].find(th => th.textContent === t).offsetParent !== null"


def api_model(node: NodeProc, name: str, placed: bool = True) -> dict[str, Any]:
    """Model `name` as GET /api/distributed/models has it; with `placed`, once
    the catalogue in the Raft state has its placement (a second or two after start)."""
    deadline = time.monotonic() + 20
    while True:
        models = node.get("/api/distributed/models")["models"]  # type: ignore[index]
        m: dict[str, Any] = next((m for m in models if m["name"] == name), {})
        ready = bool(m) and (not placed or "replicas" in m)
        if ready or time.monotonic() > deadline:
            assert ready, (name, models)
            return m
        time.sleep(0.2)


def copies_text(m: dict[str, Any]) -> str:
    """What the copies cell says for the API's entry `m`, worked out here."""
    want, held = m["replicas"], len(m["holders"])
    text = f"{held}/{want} {'copy' if want == 1 else 'copies'}"
    if m["node_labels"]:
        text += "on nodes labelled " + ", ".join(f"{k}={v}" for k, v in m["node_labels"].items())
    if m["unplaced"]:
        text += f"⚠ {m['unplaced']} {'copy' if m['unplaced'] == 1 else 'copies'} unplaced"
        why = "; ".join(f"{n}: {r}" for n, r in m["why_not"].items())
        text += "why: " + (why or "no other node to take it yet")
    return text


def wait_row(page: Page, name: str, cells: dict[str, str], timeout: float = 15_000) -> dict[str, Any]:
    """Wait until the row of model `name` shows `cells` (column title -> text); its cells."""
    try:
        page.wait_for_function(
            "([name, cells]) => { const r = (" + MODEL_ROW + ")(name);"
            " return r !== null && Object.entries(cells).every(([k, v]) => r[k] && r[k].text === v); }",
            arg=[name, cells], timeout=timeout)
    except Exception:
        raise AssertionError(f"row {name!r} never showed {cells}; it shows "
                             f"{page.evaluate('(' + MODEL_ROW + ')', name)}") from None
    row: dict[str, Any] = page.evaluate("(" + MODEL_ROW + ")", name)
    return row


def test_dashboard_in_chromium(dash_node: NodeProc) -> None:
    node_id = dash_node.get("/health")["node_id"]  # type: ignore[index]
    # A request whose model name is hostile HTML: it is refused, and lands in "recent requests".
    status, _ = post(dash_node.web_url + "/api/playground", {"model": HOSTILE, "prompt": "x"})
    assert status in (400, 404)
    with dashboard(dash_node) as (page, problems):
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

        # where the default model lives, as the API has it: one node holds it and is
        # assigned; the default count (2) is more than a single node could hold,
        # which is not a shortage (nothing is unplaced)
        m = api_model(dash_node, MODEL)
        assert m["holders"] == [node_id] and m["assigned"] == [node_id], m
        assert m["replicas"] == 2 and m["unplaced"] == 0 and m["why_not"] == {}, m
        row = wait_row(page, MODEL, {"copies": copies_text(m), "held by": ", ".join(m["holders"]),
                                     "assigned to": ", ".join(m["assigned"])})
        assert row["copies"]["text"] == "1/2 copies", row
        assert row["copies"]["shown"] and row["held by"]["shown"] and not row["nodes"]["shown"], row
        assert page.evaluate(HEAD_SHOWN, "copies") and not page.evaluate(HEAD_SHOWN, "nodes")
        assert page.evaluate("document.querySelector('#models .copies .unplaced') === null")

        # the transfers panel: a single node copies nothing
        rep = dash_node.get("/api/distributed/replication/status")
        assert rep["transfers"] == [] and rep["totals"]["completed_in"] == 0, rep  # type: ignore[index]
        assert page.is_visible("#transfers-panel")
        assert page.text_content("#transfers tbody") == "no blob copies in progress"
        assert (page.text_content("#transfers-totals") or "").startswith("done 0 in, 0 out; 0 B in, 0 B out")

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
        # the model may answer briefly ("The Rainbow."); streamed means in pieces
        assert answer.strip() and chunks >= 2, (answer, chunks)
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



def test_dashboard_placement_reasons_are_text(tmp_path: Path) -> None:
    """A placement policy no node meets (a label key that is hostile HTML): the
    model row says every copy is unplaced and why, literally, and the node that
    still holds the bundled model shows as not assigned."""
    n = start_node(tmp_path)
    try:
        node_id = n.get("/health")["node_id"]  # type: ignore[index]
        status, body = post(n.url + "/api/distributed/placement",
                            {"model": MODEL, "replicas": 1, "node_labels": {HOSTILE: "yes"}})
        assert status == 200, body
        deadline = time.monotonic() + 20
        while (m := api_model(n, MODEL))["assigned"] and time.monotonic() < deadline:
            time.sleep(0.2)
        reason = f"label {HOSTILE}=yes missing"
        assert m["assigned"] == [] and m["unplaced"] == 1 and m["why_not"] == {node_id: reason}, m
        assert m["holders"] == [node_id], m  # the bundled default model is never dropped
        with dashboard(n) as (page, problems):
            row = wait_row(page, MODEL, {"copies": copies_text(m), "assigned to": "–",
                                         "held by": f"{node_id} (not assigned)"})
            assert row["copies"]["text"] == (f"1/1 copyon nodes labelled {HOSTILE}=yes⚠ 1 copy unplaced"
                                             f"why: {node_id}: {reason}"), row
            assert page.evaluate("document.querySelectorAll('main img').length") == 0
            assert page.evaluate("window.__pwned") is None
        assert not problems, problems
    finally:
        n.stop()


def test_dashboard_without_replication_has_no_placement(tmp_path: Path) -> None:
    """A node without the cluster core (p2p.enabled false) does not replicate: no
    placement columns, no transfers panel, the nodes column instead."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"p2p": {"enabled": False}}))
    n = start_node(tmp_path, "--config", str(cfg), "--engine", "mock")
    try:
        node_id = n.get("/health")["node_id"]  # type: ignore[index]
        models = n.get("/api/distributed/models")["models"]  # type: ignore[index]
        assert models and all("replicas" not in m for m in models), models
        assert state(n)["replication"] is None
        with dashboard(n) as (page, problems):
            name = models[0]["name"]
            row = wait_row(page, name, {"nodes": node_id})
            assert row["nodes"]["shown"] and not row["copies"]["shown"] and not row["held by"]["shown"], row
            assert page.evaluate(HEAD_SHOWN, "nodes") and not page.evaluate(HEAD_SHOWN, "copies")
            assert not page.is_visible("#transfers-panel")
        assert not problems, problems
    finally:
        n.stop()


def test_dashboard_shows_a_blob_copy_in_progress(tmp_path: Path) -> None:
    """Two nodes, the mock engine, replicas 2: a 48 MiB model made at A is
    copied to B under a 64 Mbit/s cap. B's transfers panel lists the copy with
    the peer, a percentage that grows and its rate while it runs; then the model
    row says 2/2 copies held by both, and the panel is empty again."""
    from ..cluster.test_nodes import join_args, token_of
    from ..cluster.test_replication import create_model

    env = {"OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "2", "OLLAMA_DISTRIBUTED_MODELS_DEFAULT": ""}
    name = "dash-copy:latest"
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=env)
    b = None
    try:
        a_id = a.get("/health")["node_id"]  # type: ignore[index]
        digest = "sha256:" + create_model(a, name, 48 << 20)
        size = (a.data_dir / "models" / "blobs" / digest.replace(":", "-")).stat().st_size
        b = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)), data_dir=tmp_path / "b",
                       env={**env, "OLLAMA_DISTRIBUTED_MODELS_REPLICATION_BANDWIDTH_MBPS": "64"})
        b_id = b.get("/health")["node_id"]  # type: ignore[index]
        progress = f"% of {size / 1e6:.1f} MB"
        row_js = ("p => { const r = [...document.querySelectorAll('#transfers tbody tr')]"
                  ".find(tr => tr.cells.length > 3 && tr.cells[3].textContent.endsWith(p));"
                  " return r ? {cells: [...r.cells].map(c => c.textContent), blob: r.cells[2].title} : null; }")
        with dashboard(b) as (page, problems):
            # the row, once the copy has moved (a loaded machine may show it first at 0.0 MB/s)
            page.wait_for_function("p => { const r = (" + row_js + ")(p);"
                                   " return r !== null && parseFloat(r.cells[4]) > 0; }",
                                   arg=progress, timeout=60_000)
            first = page.evaluate(row_js, progress)
            direction, peer, _, shown, rate = first["cells"]
            assert (direction, peer, first["blob"]) == ("in (fetching)", a_id, digest), first
            pct = int(shown.split("%")[0])
            assert 0 <= pct < 100, first
            assert rate.endswith(" MB/s") and 0 < float(rate.split()[0]) < 20, first  # 8 MB/s capped
            api = [t for t in b.get("/api/distributed/replication/status")["transfers"]  # type: ignore[index]
                   if t["digest"] == digest]
            assert api and api[0]["peer"] == a_id and api[0]["direction"] == "in", api
            # the panel follows the copy: a larger share a few snapshots later
            page.wait_for_function("([p, pct]) => { const r = (" + row_js + ")(p);"
                                   " return r !== null && parseInt(r.cells[3]) > pct; }",
                                   arg=[progress, pct], timeout=60_000)

            # done: both hold it, the row says so, and nothing is in progress
            deadline = time.monotonic() + 60
            while len((m := api_model(b, name))["holders"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert sorted(m["holders"]) == sorted([a_id, b_id]) and m["unplaced"] == 0, m
            row = wait_row(page, name, {"copies": "2/2 copies", "held by": ", ".join(m["holders"]),
                                        "assigned to": ", ".join(m["assigned"])})
            assert copies_text(m) == row["copies"]["text"]
            page.wait_for_function("() => document.querySelector('#transfers tbody').textContent"
                                   " === 'no blob copies in progress'", timeout=15_000)
            totals = b.get("/api/distributed/replication/status")["totals"]  # type: ignore[index]
            assert totals["completed_in"] >= 1 and totals["bytes_in"] >= size, totals
            page.wait_for_function("t => document.getElementById('transfers-totals').textContent.startsWith(t)",
                                   arg=f"done {totals['completed_in']} in, 0 out", timeout=10_000)
        assert not problems, problems
    finally:
        if b is not None:
            b.stop()
        a.stop()


def test_a_failing_replication_status_is_shown_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """The snapshot's replication part: None without a replicator; a status that
    raises becomes an error for the page (the rest of the feed goes on), logged once."""
    from types import SimpleNamespace

    from ollama_distributed.web import app

    class Broken:
        def status(self) -> dict[str, Any]:
            raise RuntimeError("the core is gone")

    assert app.replication(SimpleNamespace(replicator=None)) is None  # type: ignore[arg-type]
    broken = SimpleNamespace(replicator=Broken())
    with caplog.at_level("WARNING", logger=app.__name__):
        for _ in range(3):
            assert app.replication(broken) == {  # type: ignore[arg-type]
                "error": "RuntimeError: the core is gone", "transfers": [], "totals": {}}
    assert [r.getMessage() for r in caplog.records] == [
        "dashboard: replication status failed: RuntimeError: the core is gone"]
    fine = SimpleNamespace(replicator=SimpleNamespace(status=lambda: {"transfers": [], "totals": {"bytes_in": 1},
                                                                      "tombstones": {"x": 1.0}}))
    assert app.replication(fine) == {"transfers": [], "totals": {"bytes_in": 1},  # type: ignore[arg-type]
                                     "bandwidth_limit_bytes_per_sec": None, "models_in_progress": None,
                                     "copies_unplaced": None}
