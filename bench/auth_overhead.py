#!/usr/bin/env python3
"""What API keys and their limits add to a request, with 10,000 keys in force.

Two nodes with the same config (mock engine), started side by side: one has no
keys, the other 10,000 (made in its data dir before it starts; it moves them
into its Raft state). The same cheap request (GET /api/version, keep-alive)
goes to each in turn, interleaved so drift hits both alike; the keyed one
carries a key with rpm and tpm limits, so the lookup, the role check and both
buckets run. Prints p50 and p99 of each per round and their difference (the
median over rounds: a shared machine's spikes land in one round, not all),
and the guard's own cost in-process (hash, lookup, buckets) on the same keys.
Never asserts: these machines are shared and noisy.

    .venv/bin/python bench/auth_overhead.py [--requests 3000] [--rounds 5] [--keys 10000]
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ollama_distributed.security.keys import KeyRing, LocalKeyFile, make_record


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    api = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_distributed.cli.main", "start", "--data-dir", str(data_dir),
         "--api-port", str(api), "--web-port", str(free_port()),
         "--p2p-port", str(free_port(socket.SOCK_DGRAM)), "--engine", "mock", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(data_dir)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", api, timeout=1)
            c.request("GET", "/health/ready")
            if c.getresponse().status == 200:
                return proc, api
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"node in {data_dir} exited during start")
        time.sleep(0.02)
    raise SystemExit("node not ready in 120 s")


def make_keys(data_dir: Path, n: int) -> str:
    """n keys in the node's key file; returns a limited one's secret."""
    data_dir.mkdir(parents=True, exist_ok=True)
    records = [make_record(f"k{i:05d}")[1] for i in range(n - 1)]
    secret, limited = make_record("bench", "user", rpm=10**9, tpm=10**9)
    LocalKeyFile(data_dir).add([*records, limited])
    return secret


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def in_process(data_dir: Path, secret: str, runs: int) -> list[float]:
    """The guard's work per request: sha256 + dict lookup + compare_digest + both buckets."""
    ring = KeyRing(data_dir)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rec = ring.lookup(secret)
        assert rec is not None
        ring.admit(rec, time.monotonic())
        ring.charge(rec, 1)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000, help="per node and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keys", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="od-auth-bench-") as tmp:
        plain_dir, keyed_dir = Path(tmp) / "plain", Path(tmp) / "keyed"
        t0 = time.perf_counter()
        secret = make_keys(keyed_dir, args.keys)
        made = time.perf_counter() - t0
        micro = in_process(keyed_dir, secret, 20_000)
        plain, plain_port = start(plain_dir)
        t0 = time.perf_counter()
        keyed, keyed_port = start(keyed_dir)
        keyed_start = time.perf_counter() - t0
        try:
            conns = {p: http.client.HTTPConnection("127.0.0.1", p, timeout=10) for p in (plain_port, keyed_port)}
            headers = {plain_port: {}, keyed_port: {"Authorization": f"Bearer {secret}"}}
            for p in conns:  # the keyed node must refuse a keyless request: the keys are in force
                conns[p].request("GET", "/api/version")
                r = conns[p].getresponse()
                r.read()
                assert r.status == (401 if p == keyed_port else 200), (p, r.status)
            rounds: list[dict[int, list[float]]] = []
            for rnd in range(args.rounds + 1):  # round 0 warms up
                times: dict[int, list[float]] = {plain_port: [], keyed_port: []}
                order = (plain_port, keyed_port) if rnd % 2 else (keyed_port, plain_port)
                for i in range(args.requests * 2):
                    p = order[i % 2]
                    t = time.perf_counter()
                    conns[p].request("GET", "/api/version", headers=headers[p])
                    r = conns[p].getresponse()
                    r.read()
                    elapsed = time.perf_counter() - t
                    assert r.status == 200, r.status
                    times[p].append(elapsed)
                if rnd:
                    rounds.append(times)
        finally:
            for proc in (plain, keyed):
                proc.terminate()
                proc.wait(30)
    print(f"{args.keys} keys made in {made:.1f} s; the keyed node started (moving them into Raft) in "
          f"{keyed_start:.1f} s")
    print(f"GET /api/version, {args.rounds} rounds of {args.requests} requests per node, interleaved, "
          "keep-alive; ms:")
    print(f"  {'round':>5} {'p50 none':>9} {'p50 keys':>9} {'added':>7}   {'p99 none':>9} {'p99 keys':>9} "
          f"{'added':>7}")
    added50, added99 = [], []
    for i, t in enumerate(rounds, 1):
        a, b = t[plain_port], t[keyed_port]
        d50, d99 = pct(b, 50) - pct(a, 50), pct(b, 99) - pct(a, 99)
        added50.append(d50)
        added99.append(d99)
        print(f"  {i:>5} {pct(a, 50) * 1e3:9.3f} {pct(b, 50) * 1e3:9.3f} {d50 * 1e3:7.3f}   "
              f"{pct(a, 99) * 1e3:9.3f} {pct(b, 99) * 1e3:9.3f} {d99 * 1e3:7.3f}")
    print(f"  added latency, median over rounds: p50 {statistics.median(added50) * 1e3:.3f} ms, "
          f"p99 {statistics.median(added99) * 1e3:.3f} ms (target p99 <= 0.2 ms)")
    print(f"guard in-process (lookup + rpm + tpm buckets), {len(micro)} runs: p50 {pct(micro, 50) * 1e6:.1f} µs, "
          f"p99 {pct(micro, 99) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
