"""Scheduler decision time from Python: one `Scheduler.route()` call with 100
nodes × 20 models, next to the Rust figure (`cargo bench --bench scheduler`).
Prints figures; asserts nothing.

    .venv/bin/python bench/scheduler_decision.py
"""

from __future__ import annotations

import statistics
import time

from ollama_distributed import _core

NODES, MODELS_PER_NODE, MODEL_POOL, CALLS = 100, 20, 40, 50_000


def main() -> None:
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
    times.sort()
    q = statistics.quantiles(times, n=100)
    print(f"Scheduler.route() from Python: {NODES} nodes x {MODELS_PER_NODE} models, {CALLS} calls: "
          f"p50 {q[49] / 1000:.2f} us, p99 {q[98] / 1000:.2f} us (target p50 <= 20 us)")


if __name__ == "__main__":
    main()
