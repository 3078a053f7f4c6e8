#!/usr/bin/env python3
"""Prefix-aware routing against round robin, least loaded and the users'
alternatives, on one workload, printed side by side (issue 12's benchmark).

Three nodes on the real llama.cpp engine (the bundled SmolLM2, one thread
each). 12 tenants, each with its own ~1,000-token system prompt and short
questions; tenants drawn Zipf(1.1) with a fixed seed; the same request
sequence replayed, by a closed loop of --concurrency clients, under:

- the cluster with scheduler.policy round_robin, least_loaded, prefix_aware
  (restarted for each, so no cache carries over; every request enters at
  node a);
- the three nodes standalone (no cluster) behind LiteLLM's proxy (router
  strategies simple-shuffle and least-busy) and behind ollama-herd, both
  installed from PyPI into bench/.venv-alt (created here). An alternative that
  cannot be installed or run prints why instead of numbers.

Per run: cache hit rate (cached prompt tokens / prompt tokens, from the
engines' counters ollama_distributed_prompt_tokens_cached_total and
..._evaluated_total when the nodes have them; otherwise estimated per request
from prompt_eval_duration and the cold evaluation rate measured first, and
marked "est."), against the oracle (every request after its tenant's first
one hits); mean and p90 time to first token; throughput; max/mean in-flight
per node (each node's in-flight gauge, sampled every 0.2 s, averaged over the
run). Asserts nothing.

    .venv/bin/python bench/prefix_routing.py [--requests 12] [--concurrency 3] [--skip-alternatives]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import alternatives
from alternatives import BENCH_KEY, free_port, get, until

MODEL = "smollm2:135m"
TENANTS = 12
ZIPF_S = 1.1
REPO = Path(__file__).resolve().parent.parent
WORDS = ("invoice", "payment", "customer", "refund", "account", "balance", "policy", "contract", "service",
         "delivery", "warranty", "discount", "order", "shipping", "return", "credit", "tax", "receipt",
         "subscription", "renewal", "support", "ticket", "priority", "escalation", "manager", "region",
         "currency", "exchange", "deadline", "approval", "audit", "ledger", "quarter", "budget", "vendor")


def system_prompt(t: int) -> str:
    """Tenant t's own ~1,000-token system prompt (deterministic)."""
    rng = random.Random(1000 + t)
    rules = []
    for i in range(45):
        words = " ".join(rng.choice(WORDS) for _ in range(10))
        rules.append(f"Rule {t}.{i}: {words}.")
    return f"You are the assistant of tenant {t}. Follow these rules.\n" + "\n".join(rules)


def workload(n: int, seed: int, hot_half: bool = False) -> list[tuple[int, str]]:
    """Tenants Zipf(1.1); with `hot_half`, tenant 0 sends half the requests
    and the rest are Zipf over all twelve (the bounded-load case)."""
    rng = random.Random(seed)
    weights = [1 / (k ** ZIPF_S) for k in range(1, TENANTS + 1)]
    tenants = rng.choices(range(TENANTS), weights, k=n)
    if hot_half:
        tenants = [0 if rng.random() < 0.5 else t for t in tenants]
    return [(t, f"Question {i}: which rule mentions {rng.choice(WORDS)}?") for i, t in enumerate(tenants)]


def post(url: str, body: dict[str, Any], timeout: float = 600) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    p2p_port: int

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of a metric's samples with these labels; None when the node has no such metric."""
        text = get(self.url + "/metrics").decode()
        total, seen = 0.0, False
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
                seen = True
        return total if seen else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_node(data_dir: Path, env: dict[str, str], *args: str) -> Node:
    api, p2p = free_port(), free_port(socket.SOCK_DGRAM)
    full = {**os.environ, "OLLAMA_DISTRIBUTED_ENGINE_THREADS": "1", "OLLAMA_DISTRIBUTED_ENGINE_KIND": "llamacpp",
            "OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "3", "HOME": str(data_dir.parent), **env}
    full.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
    log = open(data_dir.parent / f"{data_dir.name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_distributed.cli.main", "start", "--data-dir", str(data_dir),
         "--api-port", str(api), "--web-port", str(free_port()), "--p2p-port", str(p2p),
         "--log-level", "warning", *args], stdout=log, stderr=subprocess.STDOUT, env=full)
    node = Node(proc, f"http://127.0.0.1:{api}", data_dir, p2p)
    until(f"{data_dir.name} ready", 180, lambda: get(node.url + "/health/ready") != b"" and proc.poll() is None)
    return node


def start_cluster(tmp: Path, policy: str) -> list[Node]:
    env = {"OLLAMA_DISTRIBUTED_SCHEDULER_POLICY": policy}
    a = start_node(tmp / "a", env)
    token = subprocess.run([sys.executable, "-m", "ollama_distributed.cli.main", "cluster", "token",
                            "--data-dir", str(a.data_dir)], capture_output=True, text=True, check=True,
                           env={**os.environ, "HOME": str(tmp)}).stdout.strip()
    join = ("--join", f"127.0.0.1:{a.p2p_port}", "--token", token)
    nodes = [a, start_node(tmp / "b", env, *join), start_node(tmp / "c", env, *join)]

    def all_hold() -> bool:
        models = json.loads(get(a.url + "/api/distributed/models"))["models"]
        active = [x for x in json.loads(get(a.url + "/api/distributed/nodes"))["nodes"] if x["status"] == "active"]
        return len(active) == 3 and any(m["name"] == MODEL and len(m["nodes"]) == 3 for m in models)

    until("a sees 3 nodes holding the model", 120, all_hold)
    time.sleep(2)
    return nodes


def start_standalone(tmp: Path) -> list[Node]:
    return [start_node(tmp / name, {"OLLAMA_DISTRIBUTED_P2P_ENABLED": "false"}) for name in ("a", "b", "c")]


def preload(nodes: list[Node]) -> None:
    for n in nodes:  # an empty request loads the model where it is sent (each node holds it)
        post(n.url + "/api/generate", {"model": MODEL, "keep_alive": "1h"})


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_est: float = 0.0
    generated: int = 0
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)
    load_ratio: float = 0.0
    counters: tuple[float, float] | None = None  # (cached, evaluated) from the engines


def messages(t: int, q: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt(t)}, {"role": "user", "content": q}]


def ask_ollama(url: str, t: int, q: str, tokens: int) -> tuple[float, dict[str, Any]]:
    body = {"model": MODEL, "messages": messages(t, q), "stream": True, "keep_alive": "1h",
            "options": {"num_predict": tokens, "temperature": 0}}
    req = urllib.request.Request(url + "/api/chat", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft: float | None = None
    final: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            chunk = json.loads(line)
            if ttft is None and (chunk.get("message") or {}).get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("done"):
                final = chunk
    return (ttft if ttft is not None else time.perf_counter() - t0), final


def ask_openai(url: str, t: int, q: str, tokens: int) -> tuple[float, dict[str, Any]]:
    body = {"model": "smollm2", "messages": messages(t, q), "stream": True, "max_tokens": tokens,
            "temperature": 0, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"})
    t0 = time.perf_counter()
    ttft: float | None = None
    final: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=900) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
            if ttft is None and delta.get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                u = chunk["usage"]
                final = {"prompt_eval_count": u.get("prompt_tokens", 0), "eval_count": u.get("completion_tokens", 0)}
    return (ttft if ttft is not None else time.perf_counter() - t0), final


class LoadSampler:
    """Each node's in-flight gauge every 0.2 s; max over mean of the per-node averages."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.sums = [0.0] * len(nodes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for i, n in enumerate(self.nodes):
                try:
                    self.sums[i] += n.metric("ollama_distributed_in_flight_requests") or 0.0
                except OSError:
                    pass

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def ratio(self) -> float:
        mean = sum(self.sums) / len(self.sums)
        return max(self.sums) / mean if mean else 0.0


def engine_counters(nodes: list[Node]) -> tuple[float, float] | None:
    cached = [n.metric("ollama_distributed_prompt_tokens_cached_total") for n in nodes]
    evaluated = [n.metric("ollama_distributed_prompt_tokens_evaluated_total") for n in nodes]
    if any(c is None for c in cached) or any(e is None for e in evaluated):
        return None
    return sum(c or 0.0 for c in cached), sum(e or 0.0 for e in evaluated)


def replay(ask: Callable[[int, str], tuple[float, dict[str, Any]]], seq: list[tuple[int, str]],
           nodes: list[Node], concurrency: int, cold_rate: float) -> Result:
    res = Result()
    before = engine_counters(nodes)
    lock = threading.Lock()
    work: Iterator[tuple[int, str]] = iter(list(seq))

    def client() -> None:
        while True:
            with lock:
                item = next(work, None)
            if item is None:
                return
            try:
                ttft, final = ask(*item)
            except (OSError, urllib.error.URLError, ValueError) as e:
                with lock:
                    res.errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            with lock:
                res.ttft.append(ttft)
                p = int(final.get("prompt_eval_count") or 0)
                res.prompt_tokens += p
                res.generated += int(final.get("eval_count") or 0)
                dur = final.get("prompt_eval_duration")
                if dur and cold_rate:
                    res.cached_est += max(0.0, p - dur / 1e9 * cold_rate)

    t0 = time.perf_counter()
    with LoadSampler(nodes) as sampler, ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    res.wall = time.perf_counter() - t0
    res.load_ratio = sampler.ratio()
    after = engine_counters(nodes)
    if before is not None and after is not None:
        res.counters = (after[0] - before[0], after[1] - before[1])
    return res


def oracle(seq: list[tuple[int, str]]) -> float:
    """Share of prompt tokens a perfect cache would skip: every request after
    its tenant's first reuses the system prompt (the question is not cached)."""
    sys_chars = sum(len(system_prompt(t)) for t, _ in seq)
    seen: set[int] = set()
    cacheable = 0
    for t, _ in seq:
        if t in seen:
            cacheable += len(system_prompt(t))
        seen.add(t)
    total = sys_chars + sum(len(q) + 40 for _, q in seq)  # + the template around them
    return cacheable / total


def cold_rate(node: Node) -> float:
    """Prompt tokens per second of a cold evaluation on one idle node."""
    final = post(node.url + "/api/chat", {"model": MODEL, "stream": False, "options": {"num_predict": 1},
                                          "messages": messages(99, "calibration")})
    return float(final["prompt_eval_count"]) / (final["prompt_eval_duration"] / 1e9)


def row(name: str, res: Result | None, orc: float, note: str = "") -> str:
    if res is None:
        return f"{name:<28} {note}"
    if not res.ttft:
        return f"{name:<28} no answers ({len(res.errors)} errors: {res.errors[:1]})"
    if res.counters is not None and sum(res.counters):
        hit, how = res.counters[0] / sum(res.counters), ""
    elif res.prompt_tokens and res.cached_est:
        hit, how = res.cached_est / res.prompt_tokens, " est."
    else:
        hit, how = float("nan"), " n/a"
    ttft = sorted(res.ttft)
    p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
    return (f"{name:<28} hit {hit:6.1%}{how:<5} ({hit / orc:5.0%} of oracle)  TTFT mean {statistics.mean(ttft):6.2f} s"
            f"  p90 {p90:6.2f} s  {len(ttft) / res.wall:5.2f} req/s {res.generated / res.wall:6.1f} tok/s"
            f"  max/mean in-flight {res.load_ratio:4.2f}" + (f"  errors {len(res.errors)}" if res.errors else ""))


def ratios(results: dict[str, Result], orc: float) -> list[str]:
    """The targets, as ratios of figures measured in this run."""
    mean = {k: statistics.mean(r.ttft) for k, r in results.items() if r.ttft}
    out = []
    pa = results.get("cluster prefix_aware")
    if pa is None or "cluster prefix_aware" not in mean:
        return out
    ours = mean["cluster prefix_aware"]
    if "cluster round_robin" in mean:
        out.append(f"prefix_aware mean TTFT {mean['cluster round_robin'] / ours:.1f}x lower than round_robin "
                   "(target >= 3x)")
    alts = {k: v for k, v in mean.items() if not k.startswith("cluster ")}
    if alts:
        best = min(alts, key=lambda k: alts[k])
        out.append(f"prefix_aware mean TTFT {alts[best] / ours:.1f}x lower than the best alternative ({best}) "
                   "(target >= 3x)")
    if pa.counters is not None and sum(pa.counters):
        out.append(f"prefix_aware hit rate {pa.counters[0] / sum(pa.counters) / orc:.0%} of the oracle's "
                   "(target >= 90%)")
    out.append(f"prefix_aware max/mean in-flight {pa.load_ratio:.2f} (target <= 1.25 with --hot-half)")
    return out


def run_litellm(py: Path, tmp: Path, nodes: list[Node], strategy: str, seq: list[tuple[int, str]],
                args: argparse.Namespace, rate: float) -> tuple[Result | None, str]:
    try:
        with alternatives.litellm(py, tmp, "smollm2", [(f"ollama_chat/{MODEL}", n.url) for n in nodes],
                                  strategy, name=f"litellm-{strategy}") as (url, _):
            return replay(lambda t, q: ask_openai(url, t, q, args.tokens), seq, nodes, args.concurrency, rate), ""
    except alternatives.Unavailable as e:
        return None, str(e)


def run_herd(py: Path, tmp: Path, nodes: list[Node], seq: list[tuple[int, str]], args: argparse.Namespace,
             rate: float) -> tuple[Result | None, str]:
    try:
        with alternatives.herd(py, tmp, [n.url for n in nodes]) as (url, _):
            return replay(lambda t, q: ask_ollama(url, t, q, args.tokens), seq, nodes, args.concurrency, rate), ""
    except alternatives.Unavailable as e:
        return None, str(e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8, help="tokens generated per answer")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--policies", default="round_robin,least_loaded,prefix_aware",
                    help="cluster policies to run, comma-separated ('' for the alternatives alone)")
    ap.add_argument("--skip-alternatives", action="store_true")
    ap.add_argument("--hot-half", action="store_true",
                    help="tenant 0 sends half the requests (max/mean in-flight target <= 1.25)")
    args = ap.parse_args()
    # SIGTERM ends the run through the `finally`s that stop the nodes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seq = workload(args.requests, args.seed, args.hot_half)
    orc = oracle(seq)
    counts = [sum(1 for t, _ in seq if t == k) for k in range(TENANTS)]
    print(f"workload: {len(seq)} requests, {TENANTS} tenants Zipf({ZIPF_S}) seed {args.seed} "
          f"(requests per tenant {counts}), ~{len(system_prompt(0)) // 4} tokens of system prompt each, "
          f"{args.tokens} tokens per answer, {args.concurrency} clients; oracle hit rate {orc:.1%}"
          + (" (tenant 0 sends half)" if args.hot_half else ""), flush=True)
    rows: list[str] = []
    results: dict[str, Result] = {}
    rate = 0.0
    for policy in [p for p in args.policies.split(",") if p]:
        with tempfile.TemporaryDirectory(prefix="prefix-bench-") as d:
            nodes = start_cluster(Path(d), policy)
            try:
                preload(nodes)
                if not rate:
                    rate = cold_rate(nodes[1])
                    print(f"cold prompt evaluation: {rate:.0f} tokens/s on one node", flush=True)
                entry = nodes[0].url
                res = replay(lambda t, q, url=entry: ask_ollama(url, t, q, args.tokens), seq, nodes,
                             args.concurrency, rate)
                dec = {r: nodes[0].metric("ollama_distributed_routing_decisions_total", reason=r)
                       for r in ("prefix_hit", "load", "spread")}
                results[f"cluster {policy}"] = res
                rows.append(row(f"cluster {policy}", res, orc))
                print(rows[-1], f" decisions at a: {dec}", flush=True)
            finally:
                for n in nodes:
                    n.stop()
    if not args.skip_alternatives:
        py: Path | None
        try:
            py, why = alternatives.alt_python(), ""
        except alternatives.Unavailable as e:
            py, why = None, str(e)
        with tempfile.TemporaryDirectory(prefix="prefix-bench-alt-") as d:
            tmp = Path(d)
            nodes = start_standalone(tmp)
            try:
                preload(nodes)
                if not rate:
                    rate = cold_rate(nodes[1])
                    print(f"cold prompt evaluation: {rate:.0f} tokens/s on one node", flush=True)
                for strategy in ("simple-shuffle", "least-busy"):
                    res, note = (None, why) if py is None else run_litellm(py, tmp, nodes, strategy, seq, args, rate)
                    if res is not None:
                        results[f"LiteLLM {strategy}"] = res
                    rows.append(row(f"LiteLLM {strategy}", res, orc, note))
                    print(rows[-1], flush=True)
                res, note = (None, why) if py is None else run_herd(py, tmp, nodes, seq, args, rate)
                if res is not None:
                    results["ollama-herd"] = res
                rows.append(row("ollama-herd", res, orc, note))
                print(rows[-1], flush=True)
            finally:
                for n in nodes:
                    n.stop()
    print("\n".join(["", "summary:", *rows, *ratios(results, orc)]))
    if shutil.which("nproc"):
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a shared machine)")


if __name__ == "__main__":
    main()
