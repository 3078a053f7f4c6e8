"""Every request is visible: one access-log line each (method, path, status,
duration, model) at info, or at debug by `logging.access`, and
`requests_total` counts every endpoint and status once, 4xx included."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..conftest import MODEL, NodeProc, start_node

LINE = re.compile(r" INFO +ollama_distributed\.access: (\S+) (\S+) (\d{3}) (\d+\.\d{3})s model=(\S+) client=\S+$")


def call(n: NodeProc, method: str, path: str, body: Any = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(n.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)


def counts(n: NodeProc) -> dict[tuple[str, str, str], float]:
    with urllib.request.urlopen(n.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "ollama_distributed_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["endpoint"], s.labels["status"], s.labels["model"])] = s.value
    return out


def access_lines(n: NodeProc) -> list[tuple[str, str, int, float, str]]:
    return [(m[1], m[2], int(m[3]), float(m[4]), m[5]) for line in n.log().splitlines()
            if (m := LINE.search(line))]


def test_every_request_is_logged_and_counted_once(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock")
    try:
        before = counts(n)
        lines_before = len(access_lines(n))
        done = [
            ("GET", "/api/tags", None, 200),
            ("GET", "/api/ps", None, 200),
            ("GET", "/api/version", None, 200),
            ("HEAD", "/api/version", None, 200),
            ("POST", "/api/show", {"model": MODEL}, 200),
            ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}, 200),
            ("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "top_logprobs": 21}, 400),
            ("POST", "/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
            ("POST", "/v1/chat/completions", {"model": MODEL}, 400),
            ("GET", "/no/such/path", None, 404),
        ]
        for method, path, body, want in done:
            assert call(n, method, path, body) == want, (method, path)
        time.sleep(0.2)  # the count lands as the response ends
        after = counts(n)

        def grew(endpoint: str, status: str, model: str = "") -> float:
            return after.get((endpoint, status, model), 0) - before.get((endpoint, status, model), 0)

        assert grew("/api/tags", "200") == 1
        assert grew("/api/ps", "200") == 1
        assert grew("/api/version", "200") == 2  # GET and HEAD
        assert grew("/api/show", "200", MODEL) == 1
        assert grew("/api/generate", "200", MODEL) == 1  # counted once, by the dispatcher's outcome
        assert grew("/api/generate", "400", MODEL) == 1
        assert grew("/api/chat", "404", "nope") == 1
        assert grew("/v1/chat/completions", "400", MODEL) == 1
        assert grew("(unmatched)", "404") == 1
        # Exactly these, nothing counted twice (the /metrics scrapes are not counted).
        assert sum(after.values()) - sum(before.values()) == len(done)
        api: dict[str, Any] = n.get("/api/distributed/metrics")  # type: ignore[assignment]
        assert api["requests_processed"] == sum(after.values())

        lines = access_lines(n)[lines_before:]
        got = [(m, p, s) for m, p, s, _, _ in lines if p != "/metrics"]
        assert got[:len(done)] == [(m, p, s) for m, p, _, s in done], got
        generate = next(x for x in lines if x[1] == "/api/generate" and x[2] == 200)
        assert generate[4] == MODEL and generate[3] >= 0
        assert next(x for x in lines if x[1] == "/api/tags")[4] == "-"
    finally:
        n.stop()


def test_access_lines_can_go_to_debug(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", env={"OLLAMA_DISTRIBUTED_LOGGING_ACCESS": "debug"})
    try:
        assert call(n, "GET", "/api/tags") == 200
        assert call(n, "GET", "/api/version") == 200
    finally:
        n.stop()
    assert access_lines(n) == []  # at info level, the debug lines are not written
    assert "/api/tags" not in n.log()
