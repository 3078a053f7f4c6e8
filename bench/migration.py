#!/usr/bin/env python3
"""The stall a client sees when its stream migrates (issue 13), printed.

Three real nodes on the mock engine (25 tokens/s): a takes the requests and
holds no model; b and c hold it. In each trial a stream at a is interrupted
at a random token and the longest gap between two pieces the client receives
from then on is the stall (the normal gap is 40 ms):

- kill -9 of the serving worker, with the default p2p.failure_timeout_ms
  (2 s) and scheduler.stream_idle_timeout_s (60 s): the QUIC link's failure
  detection bounds it (target p95 <= 2.5 s). The killed node is restarted
  between trials.
- a drain of the serving worker (`POST /api/distributed/nodes/{id}/drain`,
  what SIGTERM does) with node.drain_timeout_s 0.5 on the workers: the
  stream runs on for the half second, then its generation is cut and it
  resumes on the other worker (target p95 <= 0.5 s). Undrained between trials.

Every trial's text is also compared with an uninterrupted run. Never asserted.

    PYTHONPATH=python .venv/bin/python bench/migration.py [--trials 20]
"""

from __future__ import annotations

import argparse
import pathlib
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.cluster.test_migration import (  # the cluster helpers the tests use
    MOCK,
    ask,
    both_route,
    chunks,
    restart,
    serving,
    start_cluster,
    stop_all,
)
from tests.cluster.test_nodes import status
from tests.conftest import NodeProc

N = 60  # tokens per stream: 2.4 s at 25 tokens/s
PROMPT = "tell me a story"


def trial(nodes: dict[str, NodeProc], at: int, act: Callable[[str], None]) -> tuple[float, str, bool]:
    """Stream at a; after `at` pieces act on the serving worker; return the
    longest gap between pieces from then on, the worker and the text."""
    stamps: list[float] = []
    text: list[str] = []
    victim = ""
    acted = 0
    for piece, _ in chunks(nodes["a"], "generate", PROMPT, N):
        if piece is None:
            break
        stamps.append(time.monotonic())
        text.append(piece)
        if len(text) == at:
            found = serving(nodes)
            victim = found[0] if found else ""
            if victim:
                act(victim)
            acted = len(stamps) - 1
    gaps = [b - a for a, b in zip(stamps[acted:], stamps[acted + 1:], strict=False)]
    return max(gaps, default=0.0), victim, "".join(text) == REF[0]


REF = [""]


def post(n: NodeProc, path: str) -> Any:
    req = urllib.request.Request(n.url + path, data=b"{}", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def report(name: str, stalls: list[float], same: int, target: float) -> None:
    print(f"{name:>8}: stall p50 {statistics.median(stalls) * 1000:6.0f} ms  p95 {pct(stalls, 95) * 1000:6.0f} ms"
          f"  max {max(stalls) * 1000:6.0f} ms  (target p95 <= {target * 1000:.0f} ms); "
          f"{same}/{len(stalls)} texts identical to the uninterrupted run", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(13)
    env = {**MOCK, "OLLAMA_DISTRIBUTED_NODE_DRAIN_TIMEOUT_S": "0.5"}
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        nodes = start_cluster(tmp, env, {"OLLAMA_DISTRIBUTED_SCHEDULER_STREAM_IDLE_TIMEOUT_S": "60"})
        try:
            REF[0] = ask(nodes["a"], "generate", PROMPT, N).text
            kills: list[float] = []
            same_kill = 0
            for i in range(args.trials):
                stall, victim, ok = trial(nodes, rng.randint(5, N - 20),
                                          lambda name: nodes[name].proc.send_signal(signal.SIGKILL))
                kills.append(stall)
                same_kill += ok
                print(f"  kill -9 trial {i}: {victim} killed, stall {stall * 1000:.0f} ms", flush=True)
                restart(nodes, victim, env)
                deadline = time.monotonic() + 90
                while not both_route(nodes) and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1.5)
            report("kill -9", kills, same_kill, 2.5)
            drains: list[float] = []
            same = 0
            for i in range(args.trials):
                ids = {k: status(nodes[k])["node_id"] for k in ("b", "c")}

                def drain(name: str, ids: dict[str, str] = ids) -> None:
                    post(nodes["a"], f"/api/distributed/nodes/{ids[name]}/drain")

                stall, victim, ok = trial(nodes, rng.randint(5, N - 30), drain)
                drains.append(stall)
                same += ok
                print(f"  drain trial {i}: {victim} drained, stall {stall * 1000:.0f} ms", flush=True)
                post(nodes["a"], f"/api/distributed/nodes/{ids[victim]}/undrain")
                time.sleep(2.5)  # the undrained advert reaches a's scheduler
            print("summary")
            report("kill -9", kills, same_kill, 2.5)
            report("drain", drains, same, 0.5)
        finally:
            stop_all(nodes)


if __name__ == "__main__":
    main()
