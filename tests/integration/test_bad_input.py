"""Bad input of every kind gets a clear error, and nothing is lost."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..conftest import MODEL, NodeProc, start_node


def call(node: NodeProc, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(node.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, dict(r.headers), json.loads(raw) if raw.strip().startswith(b"{") else raw
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, dict(e.headers), json.loads(raw) if raw.strip() else None


def post(node: NodeProc, path: str, obj: Any) -> tuple[int, dict[str, str], Any]:
    return call(node, "POST", path, json.dumps(obj).encode())


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/show",
                                  "/api/create", "/api/copy", "/v1/chat/completions"])
def test_malformed_json_is_400(node: NodeProc, path: str) -> None:
    status, _, body = call(node, "POST", path, b'{"model": "smollm2:135m",')
    assert status == 400
    msg = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert "invalid JSON" in msg


@pytest.mark.parametrize("path,obj,needle", [
    ("/api/generate", {"prompt": "hi"}, "model is required"),
    ("/api/generate", {"model": MODEL, "prompt": 5}, "prompt has the wrong type"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": "hot"}, "options has the wrong type"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"top_k": "many"}}, "option top_k must be"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "stream": "yes"}, "stream has the wrong type"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": "soon"}, "invalid keep_alive"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": "yaml"}, "format must be"),
    ("/api/chat", {"model": MODEL, "messages": "hi"}, "messages has the wrong type"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "god", "content": "x"}]}, "role must be"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": 1}]}, "content must be"),
    ("/api/embed", {"model": MODEL, "input": [1, 2]}, "input must be"),
    ("/api/copy", {"source": MODEL}, "destination is required"),
    ("/api/blobs/sha256:xyz", {}, "invalid digest"),
])
def test_missing_fields_and_wrong_types_are_400(node: NodeProc, path: str, obj: Any, needle: str) -> None:
    status, _, body = post(node, path, obj)
    assert status == 400, body
    assert needle in body["error"]


def test_non_object_body(node: NodeProc) -> None:
    status, _, body = call(node, "POST", "/api/generate", b"[1,2]")
    assert status == 400 and "JSON object" in body["error"]


HOSTILE = ["../../../etc/passwd", "/etc/passwd", "a\u0000b", "..", "x/../../y", "a/b/c/d/e", "x:../../y"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_everywhere(node: NodeProc, name: str) -> None:
    for path, obj in (("/api/generate", {"model": name, "prompt": "x"}),
                      ("/api/show", {"model": name}),
                      ("/api/create", {"model": name, "from": MODEL, "stream": False}),
                      ("/api/copy", {"source": MODEL, "destination": name}),
                      ("/api/embed", {"model": name, "input": "x"})):
        status, _, body = post(node, path, obj)
        assert status == 400, (path, body)
        assert "invalid model name" in body["error"] or "model name" in body["error"]
    status, _, body = call(node, "DELETE", "/api/delete", json.dumps({"model": name}).encode())
    assert status == 400
    assert not list(Path(node.data_dir).rglob("passwd"))


def test_unknown_model_everywhere(node: NodeProc) -> None:
    for path, obj in (("/api/generate", {"model": "ghost", "prompt": "x"}),
                      ("/api/chat", {"model": "ghost", "messages": [{"role": "user", "content": "x"}]}),
                      ("/api/embed", {"model": "ghost", "input": "x"}),
                      ("/api/show", {"model": "ghost"}),
                      ("/api/copy", {"source": "ghost", "destination": "x"})):
        status, _, body = post(node, path, obj)
        assert status == 404, (path, body)
        assert "ghost" in body["error"] and "not found" in body["error"]
    status, _, _ = call(node, "DELETE", "/api/delete", json.dumps({"model": "ghost"}).encode())
    assert status == 404


def test_body_over_limit_is_413(node: NodeProc) -> None:
    big = b'{"model": "smollm2:135m", "prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    status, _, body = call(node, "POST", "/api/generate", big)
    assert status == 413
    assert "max_body_bytes" in body["error"]


def test_wrong_blob_digest_is_refused_and_not_kept(node: NodeProc) -> None:
    data = b"not what the digest says"
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    status, _, body = call(node, "POST", f"/api/blobs/{wrong}", data,
                           headers={"Content-Type": "application/octet-stream"})
    assert status == 400 and "digest mismatch" in body["error"]
    status, _, _ = call(node, "HEAD", f"/api/blobs/{wrong}")
    assert status == 404
    right = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _, _ = call(node, "POST", f"/api/blobs/{right}", data,
                        headers={"Content-Type": "application/octet-stream"})
    assert status == 201
    assert call(node, "HEAD", f"/api/blobs/{right}")[0] == 200
    assert not list((node.data_dir / "models" / "tmp").iterdir())


def test_create_from_a_non_gguf_blob_is_refused(node: NodeProc) -> None:
    data = b"definitely not gguf"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    call(node, "POST", f"/api/blobs/{digest}", data, headers={"Content-Type": "application/octet-stream"})
    status, _, body = post(node, "/api/create", {"model": "junk", "files": {"x.gguf": digest}, "stream": False})
    assert status == 400 and "not a valid GGUF" in body["error"]
    assert post(node, "/api/show", {"model": "junk"})[0] == 404


def test_pull_and_push_refuse_bad_names_and_unreachable_registries(node: NodeProc) -> None:
    for path in ("/api/pull", "/api/push"):
        for hostile in ("../../etc/passwd", "127.0.0.1:1/a/b/c/d", "x:../y", "a/b\\c"):
            status, _, body = post(node, path, {"model": hostile})
            assert status == 400, (path, hostile, body)
            assert "invalid model name" in body["error"]
        assert post(node, path, {"model": MODEL, "insecure": "yes"})[0] == 400
    # Nothing listens on port 1: a clear 502 naming the registry, before any status is streamed.
    status, _, body = post(node, "/api/pull", {"model": "127.0.0.1:1/library/nothing:1"})
    assert status == 502 and "127.0.0.1:1" in body["error"]
    status, _, body = post(node, "/api/push", {"model": "127.0.0.1:1/library/never-made:1"})
    assert status == 404 and "never-made" in body["error"]


def test_unknown_route_is_json_404(node: NodeProc) -> None:
    status, _, body = call(node, "GET", "/api/nope")
    assert status == 404 and body == {"error": "404 page not found"}


def _in_flight(node: NodeProc) -> int:
    return int(node.get("/api/distributed/status")["scheduler_stats"]["in_flight"])  # type: ignore[index]


def test_client_disconnect_mid_stream_frees_the_slot(node: NodeProc) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": "Write a very long story about a dragon.",
                       "options": {"num_predict": 4000}})
    conn.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = json.loads(resp.readline())
    assert first["done"] is False
    assert _in_flight(node) == 1
    conn.sock.close()  # the client vanishes mid-stream
    conn.close()
    deadline = time.monotonic() + 10
    while _in_flight(node) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _in_flight(node) == 0
    # The slot really is free: a new request is served at once.
    t0 = time.monotonic()
    status, _, out = post(node, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                                  "options": {"num_predict": 2}})
    assert status == 200 and out["done"]
    assert time.monotonic() - t0 < 20


def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", env={
        "OLLAMA_DISTRIBUTED_ENGINE_MAX_QUEUE": "1", "OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "1",
        "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS_PER_SECOND": "20"})
    try:
        conns = []
        for _ in range(2):  # one runs, one waits
            c = http.client.HTTPConnection("127.0.0.1", n.api_port, timeout=30)
            c.request("POST", "/api/generate", json.dumps({"model": MODEL, "prompt": "x",
                                                           "options": {"num_predict": 40}}),
                      {"Content-Type": "application/json"})
            conns.append(c)
        deadline = time.monotonic() + 10
        while n.get("/api/distributed/status")["scheduler_stats"]["queue_depth"] != 1:  # type: ignore[index]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, headers, body = post(n, "/api/generate", {"model": MODEL, "prompt": "x"})
        assert status == 503
        assert headers.get("Retry-After") == "1"
        assert "busy" in body["error"]
        for c in conns:  # the admitted ones still finish whole
            r = c.getresponse()
            lines = [json.loads(line) for line in r.read().splitlines()]
            assert lines[-1]["done"] and lines[-1]["eval_count"] == 40
    finally:
        n.stop()
