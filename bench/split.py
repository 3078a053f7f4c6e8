#!/usr/bin/env python3
"""One model on one node vs split across two nodes through the RPC tunnel (issue 16).

Both measured in one run, on loopback, with the bundled SmolLM2-135M, greedy:

- single: one standalone node (no memory limit), llama.cpp on `--threads`.
- split: nodes a and b, each with engine.max_model_memory_mib below the
  model's size and engine.rpc_server on (offering the same amount), joined in
  one cluster. A request to a loads the model split across a's CPU and b's RPC
  server, reached only through the cluster core's mTLS QUIC tunnel (llama.cpp
  RPC -> 127.0.0.1 listener -> QUIC stream -> b's 127.0.0.1 RPC port). Each
  side computes on `--threads` threads, so on one machine the two halves take
  turns on the same cores, as they would on two machines, plus the tunnel.

Printed per mode (median of `--runs` requests after one warm-up that loads
the model): prompt tokens/s (prompt_eval_count / prompt_eval_duration of the
final chunk), generated tokens/s (eval_count / eval_duration), and for the
split the bytes that crossed the tunnel (both ways, a's counters, over the
whole request: prompt evaluation included) per generated token. Then the ratio split / single. The issue's target is split
generation >= 50% of single-node on loopback. Never asserts.

    .venv/bin/python bench/split.py [--runs 3] [--predict 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MODEL = "smollm2:135m"
CLI = [sys.executable, "-m", "ollama_distributed.cli.main"]
BUDGET_MIB = 60  # below the model's ~94 MiB; two nodes hold it together
# ~200 tokens of prompt, so prompt evaluation is measured over a real batch
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. " * 12
          + "The story begins:")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, root: Path, name: str, env: dict[str, str], join: list[str] | None = None) -> None:
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.api, self.p2p = free_port(), free_port(socket.SOCK_DGRAM)
        full = {**os.environ, "HOME": str(self.dir), "NO_COLOR": "1", **env}
        full.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
        self.log = open(self.dir / "node.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [*CLI, "start", "--data-dir", str(self.dir / "data"), "--api-port", str(self.api),
             "--web-port", str(free_port()), "--p2p-port", str(self.p2p), *(join or [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=full, cwd=self.dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"node exited: {(self.dir / 'node.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"node not ready: {(self.dir / 'node.log').read_text()[-3000:]}")

    def token(self) -> str:
        out = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(self.dir / "data")],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def generate(node: Node, predict: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": PROMPT, "stream": False, "raw": True,
            "options": {"temperature": 0, "num_predict": predict, "seed": 1}}
    req = urllib.request.Request(node.url + "/api/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out
    except urllib.error.HTTPError as e:
        raise SystemExit(f"generate failed ({e.code}): {e.read()[:500]!r}") from None


def tunnel_bytes(node: Node) -> int:
    t = node.get("/api/distributed/status")["services"].get("rpc_tunnels") or {}
    return sum(int(o["bytes_sent"]) + int(o["bytes_received"]) for o in t.get("open", []))


def measure(node: Node, runs: int, predict: int, tunnel: bool) -> dict[str, float]:
    first = generate(node, predict)  # loads the model (and, split, sends b its tensors)
    pp, tg, per_token = [], [], []
    for _ in range(runs):
        before = tunnel_bytes(node) if tunnel else 0
        out = generate(node, predict)
        assert out["response"] == first["response"], "greedy answers differ between runs"
        pp.append(out["prompt_eval_count"] / (out["prompt_eval_duration"] / 1e9))
        tg.append(out["eval_count"] / (out["eval_duration"] / 1e9))
        if tunnel:
            per_token.append((tunnel_bytes(node) - before) / max(1, out["eval_count"]))
    return {"prompt_tps": statistics.median(pp), "gen_tps": statistics.median(tg),
            "bytes_per_token": statistics.median(per_token) if per_token else 0.0,
            "prompt_tokens": first["prompt_eval_count"], "text": first["response"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--predict", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-split-"))
    common = {"OLLAMA_DISTRIBUTED_ENGINE_THREADS": str(args.threads),
              "OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "1"}
    limited = {**common, "OLLAMA_DISTRIBUTED_ENGINE_MAX_MODEL_MEMORY_MIB": str(BUDGET_MIB),
               "OLLAMA_DISTRIBUTED_ENGINE_RPC_SERVER": "true"}
    nodes: list[Node] = []
    try:
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        single = Node(root, "single", common)
        nodes.append(single)
        single.wait_ready()
        one = measure(single, args.runs, args.predict, tunnel=False)
        single.stop()
        nodes.remove(single)

        a = Node(root, "a", limited)
        nodes.append(a)
        a.wait_ready()
        b = Node(root, "b", limited, ["--join", f"127.0.0.1:{a.p2p}", "--token", a.token()])
        nodes.append(b)
        b.wait_ready()
        deadline = time.monotonic() + 120
        while sum(n.get("status") == "active" and bool(n.get("rpc", {}).get("ready"))
                  for n in a.get("/api/distributed/nodes")["nodes"]) < 2:
            if time.monotonic() > deadline:
                raise SystemExit("b's RPC server never showed in a's view")
            time.sleep(0.5)
        two = measure(a, args.runs, args.predict, tunnel=True)
        (entry,) = [m for m in a.get("/api/ps")["models"] if m.get("parts")]
        parts = ", ".join(f"{p['node']} {p['layers']} layers" for p in entry["parts"])

        same = "yes" if one["text"] == two["text"] else "NO"
        print(f"\nSmolLM2-135M Q4_1, greedy, {one['prompt_tokens']} prompt tokens, {args.predict} generated, "
              f"{args.threads} thread(s) per llama.cpp compute, median of {args.runs}")
        print(f"split across: {parts} (through the mTLS QUIC tunnel on loopback)")
        print(f"{'':10} {'prompt tok/s':>13} {'gen tok/s':>10} {'tunnel B/token':>15}")
        print(f"{'single':10} {one['prompt_tps']:13.1f} {one['gen_tps']:10.1f} {'-':>15}")
        print(f"{'split':10} {two['prompt_tps']:13.1f} {two['gen_tps']:10.1f} {two['bytes_per_token']:15.0f}")
        print(f"{'ratio':10} {two['prompt_tps'] / one['prompt_tps']:13.2f} {two['gen_tps'] / one['gen_tps']:10.2f}"
              f"   (target: split generation >= 0.50 of single)")
        print(f"same greedy text: {same}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
