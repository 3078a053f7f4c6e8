"""Does heavy I/O stall the node? /health latency at node A, idle and then
while a 1 GiB blob is uploaded to A (POST /api/blobs) and, at the same time,
A copies another 1 GiB model from peer B over QUIC (replication), in one run.
Two real node processes on the mock engine; one probe every 10 ms on a kept
connection. Prints p50/p99/max for both phases; asserts nothing. Issue 10's
target: p99 under load below 50 ms.

    .venv/bin/python bench/health_under_io.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from ollama_distributed.models.catalog import find_default_gguf

CLI = [sys.executable, "-m", "ollama_distributed.cli.main"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.api = free_port()
        self.p2p = free_port(socket.SOCK_DGRAM)
        self.data = tmp / name
        env = {**os.environ, "HOME": str(tmp), "OLLAMA_DISTRIBUTED_ENGINE_KIND": "mock", "NO_COLOR": "1"}
        self.log = open(tmp / f"{name}.log", "wb")
        self.proc = subprocess.Popen([*CLI, "start", "--data-dir", str(self.data), "--api-port", str(self.api),
                                      "--web-port", str(free_port()), "--p2p-port", str(self.p2p), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.api}"
        until(lambda: get(self.url + "/health/ready") is not None, 60)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read() or b"null")
    except OSError:
        return None


def until(check: Any, timeout: float) -> None:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise SystemExit("timed out")
        time.sleep(0.1)


def probe(port: int, stop: threading.Event, out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        t0 = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        out.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.01)


def summary(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"n={len(ms):5d}  p50 {q[49]:6.2f} ms  p99 {q[98]:7.2f} ms  max {max(ms):7.2f} ms"


def big_file(path: Path, mib: int, head: bytes = b"") -> str:
    """`head`, then different pseudo-random MiBs up to `mib` MiB; returns its sha256."""
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.write(head)
        h.update(head)
        for i in range(mib - len(head) // (1 << 20)):
            chunk = block[i % 997:] + block[: i % 997]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def upload(url: str, path: Path, digest: str) -> None:
    with open(path, "rb") as f:
        req = urllib.request.Request(f"{url}/api/blobs/sha256:{digest}", data=f, method="POST",
                                     headers={"Content-Length": str(path.stat().st_size)})
        with urllib.request.urlopen(req, timeout=600) as r:
            assert r.status in (200, 201), r.status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="size of each blob (default 1024)")
    args = ap.parse_args()
    gguf = find_default_gguf()
    if gguf is None:
        raise SystemExit("the bundled model is not installed (make dev)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"=== making two {args.mib} MiB files")
        up_digest = big_file(tmp / "upload.bin", args.mib)
        model_digest = big_file(tmp / "model.gguf", args.mib, gguf.read_bytes())
        a = Node(tmp, "a")
        token = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(a.data)], capture_output=True,
                               text=True, check=True).stdout.strip()
        b = Node(tmp, "b", "--join", f"127.0.0.1:{a.p2p}", "--token", token)
        try:
            print("=== B holds a model of the size; A is not told yet")
            upload(b.url, tmp / "model.gguf", model_digest)
            idle: list[float] = []
            stop = threading.Event()
            t = threading.Thread(target=probe, args=(a.api, stop, idle))
            t.start()
            time.sleep(5)
            stop.set()
            t.join()
            print("=== A uploads a blob and copies the model from B at once, /health probed throughout")
            busy: list[float] = []
            stop = threading.Event()
            t = threading.Thread(target=probe, args=(a.api, stop, busy))
            t.start()
            t0 = time.monotonic()
            up = threading.Thread(target=upload, args=(a.url, tmp / "upload.bin", up_digest))
            up.start()
            req = urllib.request.Request(b.url + "/api/create", method="POST", data=json.dumps(
                {"model": "big", "files": {"model.gguf": f"sha256:{model_digest}"}, "stream": False}).encode())
            urllib.request.urlopen(req, timeout=600).read()

            def a_holds_big() -> bool:
                tags = get(a.url + "/api/tags") or {"models": []}
                return any(m["name"] == "big:latest" and m["size"] > 0 for m in tags["models"])

            until(a_holds_big, 600)
            up.join(600)
            took = time.monotonic() - t0
            stop.set()
            t.join()
            print(f"upload + peer copy of {args.mib} MiB each: {took:.1f} s")
            print(f"/health idle: {summary(idle)}")
            print(f"/health busy: {summary(busy)}")
            p99 = statistics.quantiles(busy, n=100)[98]
            print(f"busy p99 / idle p99: {p99 / statistics.quantiles(idle, n=100)[98]:.1f}x; "
                  f"target p99 < 50 ms: {'met' if p99 < 50 else 'NOT met'}")
        finally:
            b.stop()
            a.stop()


if __name__ == "__main__":
    main()
