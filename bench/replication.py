"""Copy one large blob between nodes on loopback, over QUIC (the cluster
core's FetchBlob stream: mTLS, sha256 verified, fsync + rename) from one
source and from two at once (a range each), and over HTTP (curl from an
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
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

from aiohttp import web
from ollama_distributed.cluster import ClusterService


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


async def quic(tmp: pathlib.Path, blob: pathlib.Path, hexd: str, sources: int, link_mbps: int = 0) -> float:
    def svc(name: str, join: list[str] | None = None, token: str | None = None) -> ClusterService:
        return ClusterService(node_id=name, data_dir=tmp / name, host="127.0.0.1", port=udp_port(),
                              join=join or [], token=token, api_address="", failure_timeout=2.0)
    tmp = tmp / f"quic-{sources}-{link_mbps}"
    a = svc("a")
    await a.start()
    while a.status()["role"] != "leader":
        await asyncio.sleep(0.05)
    nodes = [a] + [svc(n, [a.local_address() or ""], a.join_token()) for n in ("c", "b")[:sources]]
    for n in nodes[1:]:
        await n.start()
    b = nodes[-1]
    holders = [n.node_id for n in nodes[:-1]]
    try:
        while b.status()["peers_connected"] < len(holders):
            await asyncio.sleep(0.05)
        for n in nodes:
            (tmp / n.node_id / "models" / "blobs").mkdir(parents=True, exist_ok=True)
            # the cap on the sources' uplinks; the receiver takes what comes
            n.configure_blobs(tmp / n.node_id / "models", link_mbps if n is not b else 0)
        for h in holders:
            os.link(blob, tmp / h / "models" / "blobs" / f"sha256-{hexd}")
        t0 = time.perf_counter()
        await b.fetch_blob(holders, f"sha256:{hexd}")
        return time.perf_counter() - t0
    finally:
        for n in reversed(nodes):
            await n.stop()


async def http(tmp: pathlib.Path, blob: pathlib.Path, hexd: str, link_mbps: int = 0) -> float:
    app = web.Application()
    app.router.add_static("/blobs", blob.parent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    out = tmp / "http-copy"
    try:
        t0 = time.perf_counter()
        limit = ["--limit-rate", str(link_mbps * 125_000)] if link_mbps else []
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sSf", *limit, "-o", str(out), f"http://127.0.0.1:{port}/blobs/{blob.name}")
        assert await proc.wait() == 0
        got = await asyncio.to_thread(lambda: hashlib.file_digest(open(out, "rb"), "sha256").hexdigest())
        with open(out, "rb+") as f:
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - t0
        assert got == hexd
        return elapsed
    finally:
        await runner.cleanup()


async def main() -> None:
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
            t_http = await http(tmp, blob, hexd, cap)
            t_quic = await quic(tmp, blob, hexd, 1, cap)
            t_two = await quic(tmp, blob, hexd, 2, cap)
            print(f"-- {'no cap (CPU-bound)' if not cap else f'every link capped at {cap} Mbit/s'}")
            print(f"HTTP  (aiohttp static -> curl, + sha256):  {mb / t_http:8.1f} MB/s  ({t_http:.2f} s)")
            print(f"QUIC  one source (mTLS, sha256, fsync):   {mb / t_quic:8.1f} MB/s  ({t_quic:.2f} s)")
            print(f"QUIC  two sources, a range each:          {mb / t_two:8.1f} MB/s  ({t_two:.2f} s)")
            print(f"QUIC / HTTP: {t_http / t_quic:.2f}x one source, {t_http / t_two:.2f}x two sources")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
