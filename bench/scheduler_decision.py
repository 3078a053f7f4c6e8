"""Scheduler decision time from Python: one `Scheduler.route()` call with 100
nodes × 20 models, next to the Rust figure (`cargo bench --bench scheduler`);
then the same call with a ~1,000-token prompt crossing the boundary
(scheduler.policy prefix_aware, 100 nodes, 10,000 prefixes indexed).
Prints figures; asserts nothing.

    .venv/bin/python bench/scheduler_decision.py
"""

from __future__ import annotations

import statistics
import time

from ollama_distributed import _core

NODES, MODELS_PER_NODE, MODEL_POOL, CALLS = 100, 20, 40, 50_000
PREFIXES, PROMPT_CALLS = 10_000, 20_000


def quantiles(times: list[int]) -> tuple[float, float]:
    q = statistics.quantiles(sorted(times), n=100)
    return q[49] / 1000, q[98] / 1000


def models_only() -> None:
    s = _core.Scheduler("node-0", 4, 16)
    for n in range(NODES):
        models = [f"model-{(n + k * 2) % MODEL_POOL}:7b" for k in range(MODELS_PER_NODE)]
        s.update_node(f"node-{n}", n % 17 != 5, 1_000, models, models[:2], n * 7 % 5, n % 3, 8,
                      max_loaded_models=2, busy=models[: n % 3])
    names = [f"model-{m}:7b" for m in range(MODEL_POOL)]
    for i in range(5_000):
        s.route(names[i % MODEL_POOL], 2_000)
    times = []
    clock = time.perf_counter_ns
    for i in range(CALLS):
        m = names[i % MODEL_POOL]
        t = clock()
        s.route(m, 2_000)
        times.append(clock() - t)
    p50, p99 = quantiles(times)
    print(f"Scheduler.route() from Python: {NODES} nodes x {MODELS_PER_NODE} models, {CALLS} calls: "
          f"p50 {p50:.2f} us, p99 {p99:.2f} us (target p50 <= 20 us)")


def prompt(p: int, question: int) -> str:
    """~4,000 characters; families of 10 share their first half, as tenants' system prompts do."""
    return (f"system prompt of family {p // 10}. " * 60 + f"document {p} body. " * 100
            + f" question {question}")


def with_prompt() -> None:
    s = _core.Scheduler("node-0", 4, 16)
    assert s.policy == "prefix_aware"
    for n in range(NODES):
        s.update_node(f"node-{n}", True, 1_000, ["m"], ["m"], n * 7 % 3, 0, 1_000_000, max_loaded_models=2)
    for p in range(PREFIXES):
        node = s.route("m", 1_500, prompt(p, 0))[0]
        s.dispatched(node)
        s.finished(node)
    queries = [prompt((i * 7919) % PREFIXES, i) for i in range(1_000)]
    times = []
    clock = time.perf_counter_ns
    for i in range(PROMPT_CALLS):
        q = queries[i % len(queries)]
        t = clock()
        order = s.route("m", 2_000, q)
        times.append(clock() - t)
        s.dispatched(order[0])
        s.finished(order[0])
    p50, p99 = quantiles(times)
    d = s.routing_decisions()
    print(f"Scheduler.route(prompt=...) from Python: {NODES} nodes, {PREFIXES} prefixes indexed, "
          f"{len(queries[0])}-char prompts, {PROMPT_CALLS} calls: p50 {p50:.2f} us, p99 {p99:.2f} us "
          f"(target p50 <= 30 us); decisions {d}")


def main() -> None:
    models_only()
    with_prompt()


if __name__ == "__main__":
    main()
