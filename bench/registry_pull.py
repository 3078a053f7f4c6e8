#!/usr/bin/env python3
"""Pull speed from a local registry, side by side with curl of the same blob.

Starts Debian's docker-registry on a free 127.0.0.1 port, pushes the bundled
smollm2:135m there from one node, then pulls it again and again on a second
node that has no model (its blobs removed between runs), interleaved with
`curl -o` of the same 98 MB layer straight from the registry (one stream, no
hashing). Prints MB/s for both, the ratio, and the push rate. Never asserts.

    .venv/bin/python bench/registry_pull.py [--runs 5]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MODEL = "smollm2:135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited")
        time.sleep(0.05)
    raise SystemExit(f"{url} never answered")


def start_node(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    api = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_distributed.cli.main", "start", "--data-dir", str(tmp / "data"),
         "--api-port", str(api), "--web-port", str(free_port()), "--p2p-port", str(free_port()),
         "--log-level", "warning", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    url = f"http://127.0.0.1:{api}"
    wait_http(url + "/health/ready", proc)
    return proc, url


def post(url: str, path: str, body: dict[str, object], method: str = "POST") -> list[dict[str, object]]:
    host = url.removeprefix("http://")
    c = http.client.HTTPConnection(host, timeout=600)
    c.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    lines = [json.loads(x) for x in r.read().splitlines() if x.strip()]
    if r.status != 200 or any("error" in x for x in lines):
        raise SystemExit(f"{path}: {r.status} {lines[-1:]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    exe = shutil.which("docker-registry") or sys.exit("docker-registry missing: run scripts/apt-deps.sh")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        cfg = tmp / "registry.yml"
        cfg.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                       f"    rootdirectory: {tmp / 'registry'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
        try:
            reg = subprocess.Popen([exe, "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(reg)
            wait_http(f"http://127.0.0.1:{port}/v2/", reg)
            (tmp / "a").mkdir()
            (tmp / "b").mkdir()
            a, a_url = start_node(tmp / "a")
            procs.append(a)
            (tmp / "b" / "config.yaml").write_text('models:\n  default: ""\n')
            b, b_url = start_node(tmp / "b", "--config", str(tmp / "b" / "config.yaml"))
            procs.append(b)
            name = f"127.0.0.1:{port}/library/smollm2:135m"
            post(a_url, "/api/copy", {"source": MODEL, "destination": name})
            t0 = time.perf_counter()
            post(a_url, "/api/push", {"model": name, "insecure": True})
            push_s = time.perf_counter() - t0
            gguf = next((tmp / "a" / "data" / "models" / "blobs").glob("sha256-b179*"))
            size = gguf.stat().st_size
            blob_url = f"http://127.0.0.1:{port}/v2/library/smollm2/blobs/{gguf.name.replace('-', ':', 1)}"
            blobs = tmp / "b" / "data" / "models" / "blobs"
            pulls, curls = [], []
            for _ in range(args.runs):
                for p in blobs.glob("sha256-*"):
                    p.unlink()
                t0 = time.perf_counter()
                post(b_url, "/api/pull", {"model": name, "insecure": True})
                pulls.append(time.perf_counter() - t0)
                post(b_url, "/api/delete", {"model": name}, method="DELETE")
                t0 = time.perf_counter()
                subprocess.run(["curl", "-sf", "-o", str(tmp / "curl.out"), blob_url], check=True)
                curls.append(time.perf_counter() - t0)
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(20)
    mb = size / 1e6
    pull_rate, curl_rate = mb / statistics.median(pulls), mb / statistics.median(curls)
    print(f"layer {mb:.1f} MB, {args.runs} runs, medians")
    print(f"push (node -> registry, chunked PATCH):             {mb / push_s:7.0f} MB/s")
    print(f"pull (manifest, 4 Range parts, sha256, manifest):   {pull_rate:7.0f} MB/s")
    print(f"curl -o of the same blob (1 stream, no hashing):    {curl_rate:7.0f} MB/s")
    print(f"pull / curl: {pull_rate / curl_rate:.2f}x")


if __name__ == "__main__":
    main()
