#!/usr/bin/env python3
"""The entry node's hot path against the routers people use, side by side in one run.

One backend node B (mock engine, zero delay) holds the model. The same OpenAI
`/v1/chat/completions` requests go to it four ways:

- direct to B;
- through A, a cluster node that does not hold the model and forwards every
  request to B over QUIC;
- through LiteLLM's proxy (one worker, `openai/` provider pointed at B's /v1);
- through ollama-herd's router (one `herd-node` agent for B).

The setups are interleaved round by round, so that noise on this shared
machine hits all alike. Printed, never asserted (issue 17's targets beside
the figures):

- p50 / p99 of a small non-streaming request, one client, and the added
  latency against direct (paired, request by request);
- requests/s with 32 clients on keep-alive connections;
- CPU per request of each process on the path, from /proc/<pid>/stat deltas
  over the 32-client phase (a proxy counts with its child processes);
- chunks/s of one long stream (SSE `data:` lines);
- idle RSS of A and B, before and after the load.

A third-party router that cannot be installed or started prints
"unavailable: <reason>", never numbers; the other rows still run.

    .venv/bin/python bench/peers.py [--rounds 5] [--requests 200] [--seconds 2] [--stream-tokens 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import alternatives
from forward_overhead import CLI, MODEL, Node, pct

CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENTS = 32


@dataclass
class Setup:
    name: str
    port: int
    pids: dict[str, list[int]]  # role ("A", "B", "proxy") -> the processes it covers
    lat: list[float] = field(default_factory=list)
    done: int = 0  # requests completed in the 32-client phase
    wall: float = 0.0
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds in the 32-client phase
    chunks: int = 0
    stream_s: float = 0.0
    note: str = ""  # set when the setup could not run


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request_bytes(port: int, body: dict[str, object], close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {alternatives.BENCH_KEY}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def small(i: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 16,
            "stream": False}


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One keep-alive response: Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        n = int(lower[at + 15:lower.index(b"\r\n", at)])
        return status, await reader.readexactly(n)
    body = bytearray()
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        body += await reader.readexactly(size + 2)
        if size == 0:
            return status, bytes(body)


class Client:
    """A blocking keep-alive connection for the one-client latency runs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.connect()

    def connect(self) -> None:
        """A fresh connection: servers close idle ones (uvicorn after 5 s)."""
        self.reader, self.writer = self.loop.run_until_complete(asyncio.open_connection("127.0.0.1", self.port))

    def ask(self, i: int) -> float:
        t = time.perf_counter()
        self.writer.write(request_bytes(self.port, small(i)))
        status, body = self.loop.run_until_complete(read_response(self.reader))
        dt = time.perf_counter() - t
        if status != 200:
            raise RuntimeError(f"status {status}: {body[:200]!r}")
        return dt

    def close(self) -> None:
        self.writer.close()
        self.loop.close()


async def load(s: Setup, seconds: float) -> None:
    """CLIENTS keep-alive clients asking one small request after another."""
    stop = time.perf_counter() + seconds

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        i = 0
        try:
            while time.perf_counter() < stop:
                writer.write(request_bytes(s.port, small(k * 100_000 + i)))
                status, _ = await asyncio.wait_for(read_response(reader), 60)
                i += 1
                if status == 200:
                    s.done += 1
                else:
                    s.errors += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            s.errors += 1
        finally:
            writer.close()

    before = {role: cpu_seconds(p) for role, p in s.pids.items()}
    t = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(CLIENTS)))
    s.wall += time.perf_counter() - t
    for role, p in s.pids.items():
        s.cpu[role] = s.cpu.get(role, 0.0) + cpu_seconds(p) - before[role]


def stream(s: Setup, tokens: int) -> None:
    """One long SSE stream; counts `data:` lines as they arrive (a line split
    across two reads is counted once: the marker is longer than the tail kept)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "max_tokens": tokens,
            "stream": True}
    with socket.create_connection(("127.0.0.1", s.port), timeout=120) as c:
        t = time.perf_counter()
        c.sendall(request_bytes(s.port, body, close=True))
        n, tail, head = 0, b"", b""
        while True:
            block = c.recv(1 << 16)
            if not block:
                break
            if not head:
                head = block[:12]
            n += (tail + block).count(b"data: ")
            tail = block[-5:]
        s.stream_s += time.perf_counter() - t
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream answered {head!r}")
    s.chunks += max(0, n - 1)  # not the closing [DONE]


def row(s: Setup, direct: Setup) -> str:
    if s.note:
        return f"| {s.name} | unavailable: {s.note} |"
    p50, p99 = pct(s.lat, 0.5) * 1e3, pct(s.lat, 0.99) * 1e3
    added = "–"
    if s is not direct:
        diffs = [x - y for x, y in zip(s.lat, direct.lat, strict=False)]
        added = f"+{statistics.median(diffs) * 1e3:.2f} ms (p99 {pct(diffs, 0.99) * 1e3:+.2f})"
    rps = s.done / s.wall if s.wall else 0.0
    cpu = " + ".join(f"{role} {s.cpu[role] / max(1, s.done) * 1e3:.3f} ms" for role in s.pids)
    rate = s.chunks / s.stream_s if s.stream_s else 0.0
    errors = f" ({s.errors} errors)" if s.errors else ""
    return (f"| {s.name} | {p50:.2f} ms | {added} | {p99:.2f} ms | {rps:,.0f}{errors} | {cpu} | "
            f"{rate / 1e3:,.1f}k |")


def targets(a: Setup, b: Setup) -> Iterator[str]:
    diffs = [x - y for x, y in zip(a.lat, b.lat, strict=False)]
    a_cpu = a.cpu["A"] / max(1, a.done) * 1e3
    b_fwd, b_direct = a.cpu["B"] / max(1, a.done), b.cpu["B"] / max(1, b.done)
    rps = (a.done / a.wall) / (b.done / b.wall)
    chunks = (a.chunks / a.stream_s) / (b.chunks / b.stream_s)
    yield f"added p50 through A {statistics.median(diffs) * 1e3:.2f} ms (target <= 0.5)"
    yield f"added p99 through A {pct(diffs, 0.99) * 1e3:.2f} ms (target <= 1.5)"
    yield f"CPU per forwarded request at A {a_cpu:.3f} ms (target <= 0.35)"
    yield f"CPU at B, forwarded / direct {b_fwd / b_direct:.2f}x (target <= 1.2x)"
    yield f"req/s with {CLIENTS} clients through A / direct {rps:.2f} (target >= 0.8)"
    yield f"chunks/s on one stream through A / direct {chunks:.2f} (target >= 0.85)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=200, help="one-client requests per setup per round")
    ap.add_argument("--seconds", type=float, default=2.0, help="32-client phase per setup per round")
    ap.add_argument("--stream-tokens", type=int, default=20_000)
    ap.add_argument("--skip-alternatives", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as d, contextlib.ExitStack() as stack:
        tmp = Path(d)
        b = Node(tmp, "b", env={"OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "64",
                                "OLLAMA_DISTRIBUTED_ENGINE_MAX_QUEUE": "1024"})
        stack.callback(b.stop)
        token = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(b.data)], capture_output=True,
                               text=True, check=True).stdout.strip()
        a = Node(tmp, "a", "--join", f"127.0.0.1:{b.p2p}", "--token", token)
        stack.callback(a.stop)
        b.request("POST", "/api/copy", {"source": "smollm2:135m", "destination": MODEL})
        deadline = time.monotonic() + 30
        while a.request("POST", "/api/generate", {"model": MODEL, "prompt": "x", "stream": False,
                                                 "options": {"num_predict": 1}})[0] != 200:
            if time.monotonic() > deadline:
                raise SystemExit("A never routed the model to B")
            time.sleep(0.2)
        setups = [Setup("direct to B", b.api, {"B": [b.proc.pid]}),
                  Setup("through A (cluster)", a.api, {"A": [a.proc.pid], "B": [b.proc.pid]})]
        if not args.skip_alternatives:
            py: Path | None = None
            try:
                py = alternatives.alt_python()
            except alternatives.Unavailable as e:
                setups += [Setup("LiteLLM", 0, {}, note=str(e)), Setup("ollama-herd", 0, {}, note=str(e))]
            if py is not None:
                for name, start in (
                        ("LiteLLM", lambda: alternatives.litellm(
                            py, tmp, MODEL, [(f"openai/{MODEL}", f"http://127.0.0.1:{b.api}/v1")])),
                        ("ollama-herd", lambda: alternatives.herd(py, tmp, [f"http://127.0.0.1:{b.api}"]))):
                    try:
                        url, procs = stack.enter_context(start())
                        port = int(url.rsplit(":", 1)[1])
                        s = Setup(name, port, {"proxy": descendants(procs[0].pid), "B": [b.proc.pid]})
                        Client(port).ask(0)  # it answers before it is measured
                        setups.append(s)
                    except (alternatives.Unavailable, RuntimeError, OSError) as e:
                        setups.append(Setup(name, 0, {}, note=str(e)[:300]))
        live = [s for s in setups if not s.note]
        clients = {s.name: Client(s.port) for s in live}
        for s in live:  # warm every path
            for i in range(50):
                clients[s.name].ask(i)
        idle = {name: rss_mb(n.proc.pid) for name, n in (('a', a), ('b', b))}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for c in clients.values():
                c.writer.close()
                c.connect()
            for i in range(args.requests):  # request by request, so drift hits all alike
                for s in live:
                    s.lat.append(clients[s.name].ask(r * args.requests + i))
            for s in live:
                asyncio.run(load(s, args.seconds))
            for s in live:
                stream(s, args.stream_tokens)
        for c in clients.values():
            c.close()
        time.sleep(1)
        after = {name: rss_mb(n.proc.pid) for name, n in (('a', a), ('b', b))}
        print(f"\n{args.rounds} rounds; per round {args.requests} requests of 16 tokens with one client, "
              f"{args.seconds:g} s with {CLIENTS} clients, one stream of {args.stream_tokens} chunks\n")
        print("| setup | p50 | added p50 | p99 | req/s (32 clients) | CPU per request | chunks/s, one stream |")
        print("|---|---|---|---|---|---|---|")
        for s in setups:
            print(row(s, setups[0]))
        print("\nissue 17's targets:")
        for line in targets(setups[1], setups[0]):
            print("  " + line)
        print(f"  idle RSS: A {idle['a']:.1f} MB -> {after['a']:.1f} MB after the load, "
              f"B {idle['b']:.1f} MB -> {after['b']:.1f} MB (target <= 60 MB)")
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a shared machine)")


if __name__ == "__main__":
    main()
