#!/usr/bin/env python3
"""Tenant fairness and priorities of a node's queue, measured in one run.

Engine: the mock engine (engine.kind mock), so the scheduling is what is
measured and not the model: each request costs a fixed time to first token
(mock_ttft_ms, standing for prompt evaluation) and then a per-token delay
(mock_tokens_per_second), and holds one of the node's engine.num_parallel
slots while it runs. The mock's slots do not share a CPU (a real engine's
do), so a slot count here is capacity, not a share of two cores.

1. Noisy neighbour. Tenant "heavy" sends 10x the request rate of each of
   three others (open loop, fixed seed) and overloads the node; the victim's
   p95 TTFT is compared with its solo baseline. Run twice: with tenants (the
   fair queue: X-Tenant from a trusted proxy) and as one tenant (no header:
   every request is 127.0.0.1, so the queue is first come, first served).
2. Backlogged tenants. Three tenants keep 8 requests each outstanding (closed
   loop) with answers of 16, 64 and 256 tokens; Jain's index over their token
   throughput (prompt + generated, from the final chunks), fair vs FIFO.
3. Open WebUI's case. The node's slot is busy with another user's answer when
   Open WebUI sends a chat title request (modelled as 400 generated tokens:
   what a 1,000-token prompt costs at ~260 tokens/s of prompt evaluation) and,
   10 ms later, the user's streamed answer. The answer's time to first token
   with the title sent as X-Priority: batch vs without, with one slot
   (engine.num_parallel 1, the old default) and with the auto default.

Never asserts: the figures are the result.

    .venv/bin/python bench/fairness.py [--slots 4] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

MODEL = "smollm2:135m"
TOKENS_PER_S = 100.0  # about SmolLM2-135M's generation speed on this machine's 2 cores
TTFT_MS = 300.0  # an ~80-token prompt at ~260 tokens/s of prompt evaluation


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path, slots: int | None, max_queue: int = 64) -> tuple[subprocess.Popen[bytes], str]:
    api = free_port()
    env = {**os.environ, "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS_PER_SECOND": str(TOKENS_PER_S),
           "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TTFT_MS": str(TTFT_MS),
           "OLLAMA_DISTRIBUTED_ENGINE_MAX_QUEUE": str(max_queue),
           "OLLAMA_DISTRIBUTED_API_TRUSTED_PROXIES": "127.0.0.1",
           "HOME": str(data_dir)}
    env.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
    if slots is not None:
        env["OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL"] = str(slots)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_distributed.cli.main", "start", "--engine", "mock", "--data-dir",
         str(data_dir), "--api-port", str(api), "--web-port", str(free_port()),
         "--p2p-port", str(free_port(socket.SOCK_DGRAM)), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{api}"
    deadline = time.monotonic() + 120
    import urllib.request
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("node exited during start")
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("node not ready in 120 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class Result:
    tenant: str
    status: int
    ttft: float = 0.0
    tokens: int = 0  # prompt + generated, from the final chunk
    finished: float = 0.0


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)


async def one(session: aiohttp.ClientSession, url: str, tenant: str, tokens: int, fair: bool,
              priority: str | None = None, prompt: str = "tell me something") -> Result:
    headers = {"X-Tenant": tenant} if fair else {}
    if priority:
        headers["X-Priority"] = priority
    body = {"model": MODEL, "prompt": prompt, "options": {"num_predict": tokens}}
    t0 = time.perf_counter()
    async with session.post(url + "/api/generate", json=body, headers=headers) as r:
        if r.status != 200:
            await r.read()
            return Result(tenant, r.status, finished=time.perf_counter())
        res = Result(tenant, 200)
        async for line in r.content:
            chunk = json.loads(line)
            if not res.ttft and chunk.get("response"):
                res.ttft = time.perf_counter() - t0
            if chunk.get("done"):
                res.tokens = int(chunk.get("prompt_eval_count") or 0) + int(chunk.get("eval_count") or 0)
        res.finished = time.perf_counter()
        return res


def p95(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


async def open_loop(url: str, rates: dict[str, float], seconds: float, tokens: int, fair: bool,
                    seed: int = 7) -> list[Result]:
    """Each tenant sends Poisson arrivals at its rate (requests/s) for `seconds`."""
    plan: list[tuple[float, str]] = []
    for tenant, rate in sorted(rates.items()):
        rng = random.Random(f"{seed}-{tenant}")  # a tenant's arrivals are the same alone or not
        t = rng.expovariate(rate)
        while t < seconds:
            plan.append((t, tenant))
            t += rng.expovariate(rate)
    plan.sort()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        tasks = []
        for at, tenant in plan:
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, tenant, tokens, fair)))
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, sizes: dict[str, int], depth: int, seconds: float, fair: bool) -> dict[str, float]:
    """Each tenant keeps `depth` requests outstanding; tokens per second each
    got over the middle of the run (the first and last 15% left out)."""
    done: list[Result] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker(tenant: str, n: int) -> None:
            while time.perf_counter() < end:
                r = await one(session, url, tenant, n, fair)
                if r.status != 200:
                    await asyncio.sleep(0.2)
                done.append(r)

        await asyncio.gather(*(worker(t, n) for t, n in sizes.items() for _ in range(depth)))
    lo, hi = t0 + 0.15 * seconds, t0 + 0.85 * seconds
    return {t: sum(r.tokens for r in done if r.tenant == t and lo <= r.finished < hi) / (hi - lo) for t in sizes}


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else float("nan")


async def webui(url: str, batch_title: bool) -> float:
    """The answer's TTFT when the title request arrives 10 ms before it, while
    the slot is busy with another user's answer (0.5 s of it left)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        other = asyncio.create_task(one(session, url, "other-user", int(0.5 * TOKENS_PER_S), True))
        await asyncio.sleep(TTFT_MS / 1000 + 0.05)  # it is streaming now
        title = asyncio.create_task(one(session, url, "webui", 400, True, "batch" if batch_title else None,
                                        prompt="Create a concise title for this chat " + "word " * 200))
        await asyncio.sleep(0.01)
        answer = await one(session, url, "webui", 32, True)
        await asyncio.gather(other, title)
        return answer.ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=4, help="engine.num_parallel for parts 1 and 2")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each load phase")
    args = ap.parse_args()
    print(f"engine: mock ({TOKENS_PER_S:g} tokens/s per slot, {TTFT_MS:g} ms to first token), "
          f"engine.num_parallel {args.slots}, engine.max_queue 64, scheduler.tenant_queue_share 0.5; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (the mock's timings stretch "
          "under load)")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(Path(tmp) / "a", args.slots)
        try:
            tokens = 32
            service = TTFT_MS / 1000 + tokens / TOKENS_PER_S
            light = 0.25 * args.slots / service / 3  # the three light tenants: a quarter of capacity
            rates = {"heavy": 10 * light, "victim": light, "b": light, "c": light}
            print(f"\n1. noisy neighbour: {tokens}-token answers ({service:.2f} s each); heavy sends "
                  f"{rates['heavy']:.2f} req/s, victim, b and c {light:.2f} req/s each "
                  f"({sum(rates.values()) * service / args.slots:.1f}x the node's capacity), {args.seconds:g} s")
            solo = asyncio.run(open_loop(url, {"victim": light}, args.seconds, tokens, True))
            solo_ok = [r.ttft for r in solo if r.status == 200]
            base, base50 = p95(solo_ok), statistics.median(solo_ok)
            print(f"   victim alone:          p95 TTFT {base:.3f} s, median {base50:.3f} s (n={len(solo)})")
            for fair in (True, False):
                res = asyncio.run(open_loop(url, rates, args.seconds, tokens, fair))
                v = [r for r in res if r.tenant == "victim"]
                ok = [r.ttft for r in v if r.status == 200]
                refused = {t: sum(1 for r in res if r.tenant == t and r.status != 200) for t in rates}
                label = "fair queue (tenants)" if fair else "one tenant (FIFO)  "
                mid = statistics.median(ok) if ok else float("nan")
                print(f"   {label}:  victim p95 TTFT {p95(ok):.3f} s = {p95(ok) / base:.2f}x solo "
                      f"(target <= 1.5x), median {mid:.3f} s = {mid / base50:.2f}x; "
                      f"victim refused {refused['victim']}/{len(v)}, "
                      f"heavy refused {refused['heavy']}/{sum(1 for r in res if r.tenant == 'heavy')} "
                      f"(429/503)")
                time.sleep(3)  # let the queue drain
            sizes = {"short": 16, "medium": 64, "long": 256}
            print(f"\n2. backlogged tenants, 8 outstanding each, answers of {sizes} tokens, {args.seconds:g} s")
            for fair in (True, False):
                tput = asyncio.run(closed_loop(url, sizes, 8, args.seconds, fair))
                label = "fair queue (tenants)" if fair else "one tenant (FIFO)  "
                print(f"   {label}:  tokens/s " + ", ".join(f"{t} {v:.0f}" for t, v in tput.items())
                      + f"; Jain's index {jain(list(tput.values())):.3f} (target >= 0.95)")
                time.sleep(2)
        finally:
            stop(proc)
        print("\n3. Open WebUI: title request (400 tokens) 10 ms before the streamed answer, the slot busy "
              "with another user's answer")
        for slots in (1, None):
            proc, url = start(Path(tmp) / f"w{slots}", slots)
            try:
                ps = asyncio.run(_status(url))
                plain = statistics.median([asyncio.run(webui(url, False)) for _ in range(3)])
                batch = statistics.median([asyncio.run(webui(url, True)) for _ in range(3)])
                name = f"engine.num_parallel {ps} ({'auto' if slots is None else 'set'})"
                print(f"   {name}: answer's TTFT (median of 3) title interactive {plain:.3f} s, "
                      f"title batch {batch:.3f} s ({plain / batch:.1f}x sooner)")
            finally:
                stop(proc)


async def _status(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url + "/api/distributed/status") as r:
        return (await r.json())["scheduler_stats"]["num_parallel"]


if __name__ == "__main__":
    main()
