"""Copy one large blob between nodes on loopback, over QUIC (the cluster
core's FetchBlob stream: mTLS, sha256 verified, fsync + rename) from one
source and from two at once (a range each), and over HTTP (curl from an
aiohttp static server, written to disk, then sha256), in one run. Prints MB/s
and the ratios; asserts nothing. All nodes share this machine's cores.

    .venv/bin/python bench/replication.py [--mib 1024]
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


async def quic(tmp: pathlib.Path, blob: pathlib.Path, hexd: str, sources: int) -> float:
    def svc(name: str, join: list[str] | None = None, token: str | None = None) -> ClusterService:
        return ClusterService(node_id=name, data_dir=tmp / name, host="127.0.0.1", port=udp_port(),
                              join=join or [], token=token, api_address="", failure_timeout=2.0)
    tmp = tmp / f"quic-{sources}"
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
            n.configure_blobs(tmp / n.node_id / "models")
        for h in holders:
            os.link(blob, tmp / h / "models" / "blobs" / f"sha256-{hexd}")
        t0 = time.perf_counter()
        await b.fetch_blob(holders, f"sha256:{hexd}")
        return time.perf_counter() - t0
    finally:
        for n in reversed(nodes):
            await n.stop()


async def http(tmp: pathlib.Path, blob: pathlib.Path, hexd: str) -> float:
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
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sSf", "-o", str(out), f"http://127.0.0.1:{port}/blobs/{blob.name}")
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
        t_http = await http(tmp, blob, hexd)
        t_quic = await quic(tmp, blob, hexd, 1)
        t_two = await quic(tmp, blob, hexd, 2)
        print(f"blob: {args.mib} MiB on loopback, {os.cpu_count()} cores")
        print(f"HTTP  (aiohttp static -> curl, + sha256):  {mb / t_http:8.1f} MB/s  ({t_http:.2f} s)")
        print(f"QUIC  one source (mTLS, sha256, fsync):   {mb / t_quic:8.1f} MB/s  ({t_quic:.2f} s)")
        print(f"QUIC  two sources, a range each:          {mb / t_two:8.1f} MB/s  ({t_two:.2f} s)")
        print(f"QUIC / HTTP: {t_http / t_quic:.2f}x one source, {t_http / t_two:.2f}x two sources")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
