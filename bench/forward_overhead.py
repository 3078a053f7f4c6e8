#!/usr/bin/env python3
"""What forwarding through the cluster costs, measured side by side.

Two real nodes on the mock engine (zero delay): B holds a model, A does not,
so every request at A travels A → B over QUIC and streams back. The same
request is also sent straight to B. Printed, never asserted:

- added latency of a small non-streaming request (A→B minus B direct), p50/p99
  (target: p50 <= 1 ms, p99 <= 5 ms);
- chunks/s on one long stream, through A and straight from B, over HTTP, and
  for the core relay alone (ClusterService.forward between two processes,
  no HTTP), target >= 50,000 chunks/s;
- 256 concurrent streams through A, counting errors (target: none).

    .venv/bin/python bench/forward_overhead.py [--requests 300] [--stream-tokens 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

MODEL = "relay-bench"
CLI = [sys.executable, "-m", "ollama_distributed.cli.main"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, tmp: pathlib.Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.api, self.p2p = free_port(), free_port(socket.SOCK_DGRAM)
        self.data = tmp / name
        self.proc = subprocess.Popen(
            [*CLI, "start", "--engine", "mock", "--data-dir", str(self.data), "--api-port", str(self.api),
             "--web-port", str(free_port()), "--p2p-port", str(self.p2p), "--log-level", "warning", *args],
            stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.log", "wb"),
            # replicas=1: B keeps the only copy, so every request at A is forwarded
            env={**os.environ, "HOME": str(tmp), "OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "1", **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"node {name} exited; see {tmp / (name + '.log')}")
            time.sleep(0.05)
        raise SystemExit(f"node {name} not ready")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.api, timeout=60)
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))]


def latency(node: Node, n: int, conn: http.client.HTTPConnection) -> float:
    body = json.dumps({"model": MODEL, "prompt": f"hello {n}", "stream": False, "options": {"num_predict": 16}})
    t = time.perf_counter()
    conn.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise SystemExit(f"status {r.status}")
    return time.perf_counter() - t


def stream_rate(node: Node, tokens: int) -> float:
    c = http.client.HTTPConnection("127.0.0.1", node.api, timeout=120)
    body = json.dumps({"model": MODEL, "prompt": "stream", "stream": True, "options": {"num_predict": tokens}})
    t = time.perf_counter()
    c.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    lines = 0
    while True:
        line = r.readline()
        if not line:
            break
        lines += 1
    dt = time.perf_counter() - t
    c.close()
    return lines / dt


async def concurrent(node: Node, streams: int, tokens: int) -> tuple[int, int, float]:
    async def one(i: int) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", node.api)
            body = json.dumps({"model": MODEL, "prompt": f"c{i}", "stream": True,
                               "options": {"num_predict": tokens}}).encode()
            writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            data = await asyncio.wait_for(reader.read(-1), 120)
            writer.close()
            return data.startswith(b"HTTP/1.1 200") and (b'"done": true' in data or b'"done":true' in data)
        except (OSError, TimeoutError):
            return False

    t = time.perf_counter()
    ok = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(ok), streams - sum(ok), time.perf_counter() - t


# ---- the core relay alone: two processes, ClusterService.forward, no HTTP --------

async def serve(args: argparse.Namespace) -> None:
    import logging

    from ollama_distributed.cluster import ClusterService

    logging.basicConfig(level=logging.ERROR)

    async def handler(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for i in range(int(req["n"])):
            yield {"text": "tok ", "i": i}
            if i % 256 == 255:
                await asyncio.sleep(0)

    svc = ClusterService(node_id="b-relay", data_dir=pathlib.Path(args.data), host="127.0.0.1",
                         port=args.port, join=[], token=None, api_address="")
    svc.set_inbound_handler(handler)
    await svc.start()
    print("READY", svc.join_token(), flush=True)
    await asyncio.Event().wait()


async def core_relay(tmp: pathlib.Path, tokens: int, requests: int) -> tuple[float, float, float]:
    import logging

    from ollama_distributed.cluster import ClusterService

    logging.basicConfig(level=logging.ERROR)

    port = free_port(socket.SOCK_DGRAM)
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--data",
                               str(tmp / "relay-b")], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        token = line.split()[1]
        a = ClusterService(node_id="a-relay", data_dir=tmp / "relay-a", host="127.0.0.1", port=0,
                           join=[f"127.0.0.1:{port}"], token=token, api_address="")
        await a.start()
        while not any(n["id"] == "b-relay" and n["alive"] for n in a.nodes()):
            await asyncio.sleep(0.05)
        lat = []
        for _ in range(requests):
            t = time.perf_counter()
            async for _chunk in a.forward("b-relay", {"n": 1}):
                pass
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = 0
        async for _chunk in a.forward("b-relay", {"n": tokens}):
            n += 1
        rate = n / (time.perf_counter() - t)
        await a.stop()
        return pct(lat, 0.5), pct(lat, 0.99), rate
    finally:
        server.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--stream-tokens", type=int, default=100_000)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="forward-bench-"))
    b = Node(tmp, "b", env={"OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "64"})
    token = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(b.data)], capture_output=True,
                           text=True, check=True).stdout.strip()
    a = Node(tmp, "a", "--join", f"127.0.0.1:{b.p2p}", "--token", token)
    try:
        b.request("POST", "/api/copy", {"source": "smollm2:135m", "destination": MODEL})
        deadline = time.monotonic() + 20
        while a.request("POST", "/api/generate", {"model": MODEL, "prompt": "x", "stream": False,
                                                 "options": {"num_predict": 1}})[0] != 200:
            if time.monotonic() > deadline:
                raise SystemExit("a never routed the model to b")
            time.sleep(0.2)
        ca = http.client.HTTPConnection("127.0.0.1", a.api, timeout=60)
        cb = http.client.HTTPConnection("127.0.0.1", b.api, timeout=60)
        for i in range(20):  # warm both paths
            latency(a, i, ca)
            latency(b, i, cb)
        via_a, direct = [], []
        for i in range(args.requests):  # interleaved, so drift hits both alike
            via_a.append(latency(a, i, ca))
            direct.append(latency(b, i, cb))
        added = [x - y for x, y in zip(via_a, direct, strict=True)]
        print(f"latency, non-streaming 16 tokens, {args.requests} requests each (ms):")
        print(f"  straight to B   p50 {pct(direct, .5) * 1e3:6.2f}  p99 {pct(direct, .99) * 1e3:6.2f}")
        print(f"  A -> B (QUIC)   p50 {pct(via_a, .5) * 1e3:6.2f}  p99 {pct(via_a, .99) * 1e3:6.2f}")
        print(f"  added by A      p50 {statistics.median(added) * 1e3:6.2f}  p99 {pct(added, .99) * 1e3:6.2f}"
              "   (target p50 <= 1 ms, p99 <= 5 ms)")
        ra, rb = stream_rate(a, args.stream_tokens), stream_rate(b, args.stream_tokens)
        print(f"one stream of {args.stream_tokens} chunks over HTTP: straight to B {rb:,.0f}/s, "
              f"through A {ra:,.0f}/s (ratio {ra / rb:.2f})")
        p50, p99, rate = asyncio.run(core_relay(tmp, args.stream_tokens, args.requests))
        print(f"core relay alone (ClusterService.forward, 2 processes): 1-chunk request p50 {p50 * 1e3:.2f} ms "
              f"p99 {p99 * 1e3:.2f} ms; one stream {rate:,.0f} chunks/s (target >= 50,000)")
        ok, bad, dt = asyncio.run(concurrent(a, args.streams, 64))
        print(f"{args.streams} concurrent streams of 64 chunks through A: {ok} ok, {bad} errors in {dt:.2f}s "
              "(target: no error)")
    finally:
        a.stop()
        b.stop()


if __name__ == "__main__":
    main()
