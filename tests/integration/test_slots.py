"""Slots, eviction and keep_alive expiry on the real llama.cpp engine."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import ollama

from ..conftest import MODEL, start_node


def test_parallel_slots_and_lru_eviction(tmp_path: Path) -> None:
    n = start_node(tmp_path, env={"OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "2",
                                  "OLLAMA_DISTRIBUTED_ENGINE_MAX_LOADED_MODELS": "1",
                                  "OLLAMA_DISTRIBUTED_ENGINE_KEEP_ALIVE": "2s"})
    try:
        c = ollama.Client(host=n.url, timeout=120)
        c.copy(MODEL, "other:v1")
        # Two requests at once run at once: both are in flight together.
        peak = 0
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                with urllib.request.urlopen(n.url + "/api/distributed/status") as r:
                    peak = max(peak, json.loads(r.read())["scheduler_stats"]["in_flight"])
                time.sleep(0.02)

        t = threading.Thread(target=watch)
        t.start()
        outs: list[str] = []
        workers = [threading.Thread(target=lambda: outs.append(c.generate(
            MODEL, "Tell me a long story.", options={"num_predict": 48}).response)) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        done.set()
        t.join()
        assert len(outs) == 2 and all(outs)
        assert peak == 2
        # max_loaded_models=1: loading a second model evicts the idle first one.
        assert [m.model for m in c.ps().models] == [MODEL]
        c.generate("other:v1", "Hi", options={"num_predict": 1})
        assert [m.model for m in c.ps().models] == ["other:v1"]
        # keep_alive (2s here) expiry unloads the idle model.
        deadline = time.monotonic() + 10
        while c.ps().models:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        n.stop()
