#!/usr/bin/env python3
"""A continuous client load for the rolling-upgrade test (test_rolling_upgrade.py).

Runs outside the guests (in a network namespace of the test, where it reaches
every host's API), standard library only. WORKERS threads each send one request
after another, rotating through both APIs, streaming and not:

    ollama-chat-stream   POST /api/chat              NDJSON, ends with done: true
    ollama-generate      POST /api/generate          one JSON object, done: true
    openai-chat-stream   POST /v1/chat/completions   SSE, ends with data: [DONE]
    openai-chat          POST /v1/chat/completions   one JSON object with a choice

A request counts as ok only when its status is 200, no error object came in the
body, and the stream ended as its protocol says; nothing is retried. Each
request starts with a new TCP connection to the host the control file names at
that moment (what a load balancer in front of the hosts does), so moving the
load to another host is one write of that file.

The control file is JSON {"target": IP, "phase": NAME, "stop": bool}, re-read
before each request. Every finished request is one JSON line in the log:
{"phase", "target", "kind", "ok", "error", "start", "seconds"}.

    loadgen.py CONTROL LOG [--workers 3] [--model smollm2:135m] [--port 8080]
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

KINDS = ("ollama-chat-stream", "ollama-generate", "openai-chat-stream", "openai-chat")
PROMPTS = ("Name three colours of the rainbow.", "Say hello in French.",
           "Count from one to five.", "What is the capital of Italy?")
TOKENS = 12  # short answers: many requests per phase, each a complete exchange
TIMEOUT_S = 180  # liveness only: a loaded 2-core machine runs three guests


class Failed(Exception):
    pass


def request(host: str, port: int, kind: str, model: str, prompt: str) -> None:
    """One exchange; raises on anything but a complete, error-free answer."""
    msgs = [{"role": "user", "content": prompt}]
    if kind.startswith("ollama"):
        opts = {"num_predict": TOKENS, "temperature": 0}
        if kind == "ollama-chat-stream":
            path, body = "/api/chat", {"model": model, "messages": msgs, "stream": True, "options": opts}
        else:
            path, body = "/api/generate", {"model": model, "prompt": prompt, "stream": False, "options": opts}
    else:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": msgs, "max_tokens": TOKENS, "temperature": 0,
                "stream": kind.endswith("-stream")}
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise Failed(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        if kind == "ollama-chat-stream":
            last: dict[str, Any] = {}
            for line in resp:
                if not line.strip():
                    continue
                last = json.loads(line)
                if "error" in last:
                    raise Failed(f"error chunk: {last['error']}")
            if last.get("done") is not True:
                raise Failed(f"stream ended without done: {last}")
        elif kind == "openai-chat-stream":
            done = False
            for raw in resp:
                text = raw.decode().strip()
                if not text.startswith("data:"):
                    continue
                data = text[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                if "error" in json.loads(data):
                    raise Failed(f"error event: {data[:300]}")
            if not done:
                raise Failed("SSE stream ended without [DONE]")
        else:
            out = json.loads(resp.read())
            if "error" in out:
                raise Failed(f"error: {out['error']}")
            if kind == "ollama-generate" and out.get("done") is not True:
                raise Failed(f"not done: {out}")
            if kind == "openai-chat" and not out.get("choices", [{}])[0].get("finish_reason"):
                raise Failed(f"no finish_reason: {out}")
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("control", type=Path)
    ap.add_argument("log", type=Path)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    lock = threading.Lock()
    log = args.log.open("a", buffering=1)

    def control() -> dict[str, Any]:
        while True:
            try:
                return json.loads(args.control.read_text())  # type: ignore[no-any-return]
            except (OSError, ValueError):  # replaced while we read: read again
                time.sleep(0.01)

    def worker(i: int) -> None:
        n = i
        while True:
            c = control()
            if c.get("stop"):
                return
            kind, prompt = KINDS[n % len(KINDS)], PROMPTS[(n // len(KINDS)) % len(PROMPTS)]
            n += 1
            t0 = time.time()
            error = ""
            try:
                request(c["target"], args.port, kind, args.model, prompt)
            except Exception as e:  # every failure is counted, whatever it is
                error = f"{type(e).__name__}: {e}"
            rec = {"phase": c["phase"], "target": c["target"], "kind": kind, "ok": not error,
                   "error": error, "start": t0, "seconds": round(time.time() - t0, 3)}
            with lock:
                log.write(json.dumps(rec) + "\n")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
