#!/usr/bin/env python3
"""Warm prefixes on one node (engines/prefixcache.py), printed side by side.

One real node on the llama.cpp engine and the bundled SmolLM2, started twice
in one run: with the prompt cache (`engine.prompt_cache_mib`, 512 MiB by
default) and without it (0: one KV per slot, the behaviour before it). Each
tenant has its own ~1,000-token system prompt; questions are short. TTFT is
measured by the client (time to the first streamed piece of text).

1. Cold vs warm: a tenant's first question (its prefix evaluated whole), then
   another question with the same prefix.
2. Two tenants alternating A, B, A, B, ...: with the cache both prefixes stay
   warm; with one KV per slot each request finds the other tenant's prefix
   there and evaluates its own again. The first request of each tenant is left
   out of the figures (cold on both).

The hit rate is cached prompt tokens / prompt tokens from the node's own
counters (`ollama_distributed_prompt_tokens_cached_total` and
`..._evaluated_total`). Nothing is asserted.

    PYTHONPATH=python .venv/bin/python bench/prompt_cache.py [--rounds 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.conftest import MODEL, NodeProc, start_node

QUESTIONS = ["What is rule 3?", "Who wrote this handbook?", "Is rule 7 kind?", "Name a colour.",
             "What should I do first?", "Summarise rule 10."]


def system_prompt(tenant: str) -> str:
    """~1,000 tokens of a tenant's own rules (SmolLM2's tokenizer)."""
    rules = [f"Rule {i} for {tenant}: when a customer asks about order {i * 7}, answer briefly, kindly "
             f"and in {('English', 'plain words', 'one sentence')[i % 3]}." for i in range(31)]
    return f"You are the assistant of {tenant}. " + " ".join(rules)


def ask(n: NodeProc, tenant: str, question: str) -> tuple[float, dict[str, Any]]:
    """TTFT in seconds and the final chunk of one streamed chat turn."""
    body = {"model": MODEL, "stream": True, "options": {"temperature": 0, "num_predict": 8},
            "messages": [{"role": "system", "content": system_prompt(tenant)},
                         {"role": "user", "content": question}]}
    req = urllib.request.Request(n.url + "/api/chat", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft = None
    final: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=1800) as r:
        for line in r:
            chunk = json.loads(line)
            if ttft is None and (chunk.get("message", {}).get("content") or chunk.get("done")):
                ttft = time.perf_counter() - t0
            if chunk.get("done"):
                final = chunk
    return ttft or 0.0, final


def counters(n: NodeProc) -> tuple[float, float]:
    with urllib.request.urlopen(n.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    got = {"cached": 0.0, "evaluated": 0.0}
    for fam in text_string_to_metric_families(text):
        for kind in got:
            if fam.name == f"ollama_distributed_prompt_tokens_{kind}":
                got[kind] = sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return got["cached"], got["evaluated"]


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float:
    cached, evaluated = after[0] - before[0], after[1] - before[1]
    return cached / (cached + evaluated) if cached + evaluated else 0.0


def measure(n: NodeProc, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ask(n, "Warmup Ltd", "Hello?")  # load the model: no figure pays for it
    print("  cold vs warm ...", flush=True)
    cold, warm, cold_n, warm_n = [], [], [], []
    for r in range(rounds):
        tenant = f"Tenant {r} GmbH"
        t, f = ask(n, tenant, QUESTIONS[0])
        cold.append(t)
        cold_n.append(f["prompt_eval_count"])
        t, f = ask(n, tenant, QUESTIONS[1])
        warm.append(t)
        warm_n.append(f["prompt_eval_count"])
    out["cold"], out["warm"] = statistics.mean(cold), statistics.mean(warm)
    out["cold_n"], out["warm_n"] = statistics.mean(cold_n), statistics.mean(warm_n)
    print("  two tenants alternating ...", flush=True)
    ask(n, "Acme Inc", QUESTIONS[0])
    ask(n, "Bolt Corp", QUESTIONS[0])
    before = counters(n)
    alt, alt_n = [], []
    for q in QUESTIONS[1: 1 + rounds]:
        for tenant in ("Acme Inc", "Bolt Corp"):
            t, f = ask(n, tenant, q)
            alt.append(t)
            alt_n.append(f["prompt_eval_count"])
    out["alt"], out["alt_n"] = statistics.mean(alt), statistics.mean(alt_n)
    out["alt_p90"] = sorted(alt)[max(0, int(len(alt) * 0.9) - 1)]
    out["hit"] = hit_rate(before, counters(n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="prefixes cold/warm, and alternation rounds")
    ap.add_argument("--threads", type=int, default=0, help="engine.threads (0: one per core)")
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for label, mib in (("cache (512 MiB)", "512"), ("one KV per slot", "0")):
        print(f"=== {label}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            n = start_node(pathlib.Path(tmp), env={"OLLAMA_DISTRIBUTED_ENGINE_PROMPT_CACHE_MIB": mib,
                                                   "OLLAMA_DISTRIBUTED_ENGINE_THREADS": str(args.threads)},
                           timeout=120)
            try:
                results[label] = measure(n, args.rounds)
            finally:
                n.stop()
    cache, slot = results["cache (512 MiB)"], results["one KV per slot"]
    print()
    print(f"~1,000-token prefix, {args.rounds} prefixes, TTFT means (prompt tokens evaluated):")
    print(f"{'':34}{'cache (512 MiB)':>22}{'one KV per slot':>22}")
    for key, name in (("cold", "first question (cold)"), ("warm", "same prefix, next question")):
        print(f"{name:34}{cache[key]:>12.2f} s ({cache[key + '_n']:>5.0f}){slot[key]:>12.2f} s ({slot[key + '_n']:>5.0f})")
    print(f"{'  warm/cold':34}{cache['cold'] / max(cache['warm'], 1e-9):>13.1f}x faster"
          f"{slot['cold'] / max(slot['warm'], 1e-9):>13.1f}x faster")
    print(f"two tenants alternating, {2 * args.rounds} requests after each tenant's first:")
    print(f"{'  mean TTFT':34}{cache['alt']:>12.2f} s ({cache['alt_n']:>5.0f}){slot['alt']:>12.2f} s "
          f"({slot['alt_n']:>5.0f})")
    print(f"{'  p90 TTFT':34}{cache['alt_p90']:>14.2f} s{slot['alt_p90']:>20.2f} s")
    print(f"{'  hit rate (engine counters)':34}{cache['hit']:>15.0%}{slot['hit']:>21.0%}")
    print(f"{'  mean TTFT, one KV / cache':34}{slot['alt'] / max(cache['alt'], 1e-9):>14.1f}x")


if __name__ == "__main__":
    main()
