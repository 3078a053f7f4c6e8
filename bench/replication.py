"""Copy one large blob between nodes on loopback, over QUIC (the cluster
core's FetchBlob stream: mTLS, sha256 verified, fsync + rename; every node a
process of its own, as on its own machine) from one source and from two at
once (a range each), and over HTTP (curl from an
aiohttp static server, written to disk, then sha256), in one run. Prints MB/s
and the ratios; asserts nothing. All nodes share this machine's cores.

Two regimes, side by side:
- loopback with no cap: bound by this machine's CPU (TLS, hashing, copies for
  three nodes on the same cores), so a second source cannot add speed here;
- every link capped at --link-mbps (curl --limit-rate for HTTP,
  models.replication_bandwidth_mbps on each source node for QUIC): what a
  network-bound cluster sees, where ranges from two holders use two uplinks.

    .venv/bin/python bench/replication.py [--mib 1024] [--link-mbps 800]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import psutil
from aiohttp import web
from ollama_distributed.cluster import ClusterService


class Run(NamedTuple):
    """One copy: wall seconds, and the CPU seconds of the receiving side
    (the fetching node; curl) and of the sending side (the holders; this
    process: the static server and the sha256)."""
    elapsed: float
    cpu_in: float
    cpu_out: float


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_blob(path: pathlib.Path, mib: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            chunk = block[i % 256:] + block[: i % 256]  # every MiB different, cheap to make
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


async def node_main(args: argparse.Namespace) -> None:
    """One node in a process of its own (as on a real machine): prints its
    address and join token as JSON, then serves blobs until stdin closes; the
    fetching node (--fetch) waits for its peers, fetches and prints the time."""
    root = pathlib.Path(args.dir)
    svc = ClusterService(node_id=args.node, data_dir=root, host="127.0.0.1", port=udp_port(),
                         join=[args.join] if args.join else [], token=args.token or None,
                         api_address="", failure_timeout=2.0)
    await svc.start()
    while svc.status()["role"] not in ("leader", "follower", "learner"):
        await asyncio.sleep(0.05)
    (root / "models" / "blobs").mkdir(parents=True, exist_ok=True)
    svc.configure_blobs(root / "models", args.cap)
    try:
        if args.fetch:
            holders = args.fetch.split(",")
            while svc.status()["peers_connected"] < len(holders):
                await asyncio.sleep(0.05)
            t0, c0 = time.perf_counter(), time.process_time()
            await svc.fetch_blob(holders, f"sha256:{args.digest}")
            print(json.dumps({"elapsed": time.perf_counter() - t0, "cpu": time.process_time() - c0}), flush=True)
            return
        print(json.dumps({"address": svc.local_address(), "token": svc.join_token()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await svc.stop()


async def quic(tmp: pathlib.Path, blob: pathlib.Path, hexd: str, sources: int, link_mbps: int = 0) -> Run:
    """Holders a (and c) serve the blob; b fetches it. Every node is a process."""
    tmp = tmp / f"quic-{sources}-{link_mbps}"
    me = [sys.executable, str(pathlib.Path(__file__).resolve()), "--node-role"]
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(node: str, *extra: str, cap: int = 0) -> asyncio.subprocess.Process:
        (tmp / node / "models" / "blobs").mkdir(parents=True, exist_ok=True)
        p = await asyncio.create_subprocess_exec(
            *me, "--node", node, "--dir", str(tmp / node), "--cap", str(cap), *extra,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        procs.append(p)
        return p

    try:
        holders = ["a", "c"][:sources]
        first: dict[str, str] = {}
        for h in holders:
            (tmp / h / "models" / "blobs").mkdir(parents=True, exist_ok=True)
            os.link(blob, tmp / h / "models" / "blobs" / f"sha256-{hexd}")
            join = ["--join", first["address"], "--token", first["token"]] if first else []
            p = await spawn(h, *join, cap=link_mbps)
            assert p.stdout is not None
            info = json.loads(await p.stdout.readline())
            first = first or info
        b = await spawn("b", "--join", first["address"], "--token", first["token"],
                        "--fetch", ",".join(holders), "--digest", hexd)
        assert b.stdout is not None
        before = [psutil.Process(p.pid).cpu_times() for p in procs[:-1]]
        line = await b.stdout.readline()
        if not line:
            raise SystemExit("the fetching node failed; see its stderr above")
        after = [psutil.Process(p.pid).cpu_times() for p in procs[:-1]]
        got = json.loads(line)
        served = sum(t1.user + t1.system - t0.user - t0.system for t1, t0 in zip(after, before, strict=True))
        return Run(float(got["elapsed"]), float(got["cpu"]), served)
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()


async def http(tmp: pathlib.Path, blob: pathlib.Path, hexd: str, link_mbps: int = 0) -> Run:
    app = web.Application()
    app.router.add_static("/blobs", blob.parent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    out = tmp / "http-copy"
    try:
        t0, c0, k0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        limit = ["--limit-rate", str(link_mbps * 125_000)] if link_mbps else []
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sSf", *limit, "-o", str(out), f"http://127.0.0.1:{port}/blobs/{blob.name}")
        assert await proc.wait() == 0
        got = await asyncio.to_thread(lambda: hashlib.file_digest(open(out, "rb"), "sha256").hexdigest())
        with open(out, "rb+") as f:
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - t0
        k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert got == hexd
        return Run(elapsed, k1.ru_utime + k1.ru_stime - k0.ru_utime - k0.ru_stime, time.process_time() - c0)
    finally:
        await runner.cleanup()


async def main() -> None:
    if "--node-role" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--node-role", action="store_true")
        for opt in ("--node", "--dir", "--join", "--token", "--fetch", "--digest"):
            ap.add_argument(opt, default="")
        ap.add_argument("--cap", type=int, default=0)
        await node_main(ap.parse_args())
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--link-mbps", type=int, default=800,
                    help="the per-link cap of the second regime, in megabits per second")
    args = ap.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the HTTP side")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-repl-"))
    try:
        blob = tmp / "src" / "blob"
        blob.parent.mkdir()
        hexd = make_blob(blob, args.mib)
        subprocess.run(["sync"], check=False)
        mb = args.mib * (1 << 20) / 1e6
        print(f"blob: {args.mib} MiB on loopback, {os.cpu_count()} cores")
        for cap in (0, args.link_mbps):
            h = await http(tmp, blob, hexd, cap)
            q1 = await quic(tmp, blob, hexd, 1, cap)
            q2 = await quic(tmp, blob, hexd, 2, cap)
            print(f"-- {'no cap (CPU-bound)' if not cap else f'every link capped at {cap} Mbit/s'}")
            print(f"HTTP  (aiohttp static -> curl, + sha256):  {mb / h.elapsed:8.1f} MB/s  ({h.elapsed:.2f} s)")
            print(f"QUIC  one source (mTLS, sha256, fsync):   {mb / q1.elapsed:8.1f} MB/s  ({q1.elapsed:.2f} s)")
            print(f"QUIC  two sources, a range each:          {mb / q2.elapsed:8.1f} MB/s  ({q2.elapsed:.2f} s)")
            print(f"QUIC / HTTP: {h.elapsed / q1.elapsed:.2f}x one source, {h.elapsed / q2.elapsed:.2f}x two sources")
            print(f"QUIC CPU seconds (fetcher + holders) per run: one source {q1.cpu_in:.2f} + {q1.cpu_out:.2f},"
                  f" two sources {q2.cpu_in:.2f} + {q2.cpu_out:.2f},"
                  f" of {2 * q2.elapsed:.1f} core-seconds the two-source run had")
            print(f"HTTP CPU seconds: curl {h.cpu_in:.2f} + server and sha256 {h.cpu_out:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
