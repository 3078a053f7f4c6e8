"""Text crosses the QUIC hop intact: a chunk far larger than a QUIC packet
(split across many STREAM frames) and multi-byte UTF-8 characters right at
chunk boundaries reach the client exactly, as NDJSON (/api/chat) and as SSE
(/v1/chat/completions), when the entry node a forwards to b.

b serves the model from an OpenAI-compatible upstream this test runs on
127.0.0.1 (an engine whose text the test chooses, unlike the mock's words);
a holds nothing of it, so every byte of the answer came through the relay."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from ..conftest import start_node
from ..fakehttp import serving
from .test_nodes import converged, join_args, step, token_of, until

pytestmark = pytest.mark.cluster

MODEL = "wide"
# A 2-byte character ending a chunk whose bytes pass a packet's size; a chunk
# of ~120 KB (many QUIC frames) of 2-, 3- and 4-byte characters; a 4-byte
# character alone; one starting the last chunk after a 3-byte one ended the one before.
PIECES = ["x" * 1199 + "é", "漢字🙂é" * 10_000, "🙂", "字", "€ and done"]
TEXT = "".join(PIECES)


@contextmanager
def upstream() -> Iterator[str]:
    """An OpenAI-compatible server answering every chat with PIECES, streamed."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def do_GET(self) -> None:
            # tagged: the router keys on full names (an untagged upstream name is not matched)
            body = json.dumps({"object": "list", "data": [{"id": f"{MODEL}:latest", "object": "model",
                                                           "created": 0}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in PIECES:
                event = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")
                self.wfile.flush()
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": len(PIECES)}}
            self.wfile.write(b"data: " + json.dumps(end).encode() + b"\n\ndata: [DONE]\n\n")

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as url:
        yield url


def stream(url: str, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        data: bytes = r.read()
    return data


def test_wide_characters_and_large_chunks_cross_the_relay_intact(tmp_path: Path) -> None:
    with upstream() as up:
        b = start_node(tmp_path, "--engine", "openai", "--upstream", up, data_dir=tmp_path / "b")
        a = start_node(tmp_path, "--engine", "mock", *join_args(b, token_of(b)), data_dir=tmp_path / "a")
        try:
            until("two nodes", 30, lambda: converged([a, b], 2))
            ask = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}

            def routed() -> bool:
                return stream(a.url + "/api/chat", ask).count(b'"done":true') == 1

            until("a routes the upstream's model to b", 30, routed)

            step("NDJSON through a: every line is JSON, the text is the upstream's, byte for byte")
            raw = stream(a.url + "/api/chat", ask)
            lines = [json.loads(line) for line in raw.split(b"\n") if line]  # raises on a torn line
            assert "".join(x.get("message", {}).get("content", "") for x in lines) == TEXT
            assert lines[-1]["done"] is True

            step("SSE through a: the same text, and [DONE] last")
            raw = stream(a.url + "/v1/chat/completions", {**ask, "max_tokens": 100})
            events = [e[len(b"data: "):] for e in raw.split(b"\n\n") if e]
            assert events[-1] == b"[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == TEXT
        finally:
            a.stop()
            b.stop()
