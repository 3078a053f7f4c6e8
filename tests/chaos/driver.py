"""The chaos run (issue 10): four real node processes (three on the mock
engine, one on llama.cpp), a steady mixed workload from a few client threads,
and a scripted random schedule of faults (fixed seed, printed). Run inside a
network namespace of its own (tests/chaos/test_chaos.py makes it), so the
partitions it makes with nftables touch nothing else:

    ip netns exec NS python tests/chaos/driver.py --seed 1 --duration 120 --workdir DIR

Each node's P2P port binds its own loopback address (127.0.0.11 ...), so a
partition drops one address's UDP; the clients reach every API on 127.0.0.1.
At the end it prints a table and exits 1 if a request hung, a node crashed
without the schedule killing it, a request of the bundled model failed after
a node's death although it had not started yet, or a failure was not clear
(no status, no error line). Failures list the faults active when they began.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "ollama_distributed.cli.main"]
MODEL = "smollm2:135m"
SPARE = "chaos:1"  # deleted and re-created by the schedule
HUNG_S = 90.0  # a request without an answer this long is hung (a cold llama.cpp load takes a few s)
DISK_MIB = 400  # the tmpfs data dir of the node whose disk fills
MOCK = {"OLLAMA_DISTRIBUTED_ENGINE_KIND": "mock", "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS_PER_SECOND": "40"}
COMMON = {"OLLAMA_DISTRIBUTED_SCHEDULER_FIRST_TOKEN_TIMEOUT_S": "30",
          "OLLAMA_DISTRIBUTED_SCHEDULER_STREAM_IDLE_TIMEOUT_S": "10", "NO_COLOR": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Node:
    def __init__(self, i: int, work: Path, engine: dict[str, str]) -> None:
        self.i = i
        self.name = f"n{i}"
        self.p2p_host = f"127.0.0.{11 + i}"
        self.api = free_port()
        self.data = work / self.name
        self.env = {**os.environ, **COMMON, **engine, "HOME": str(work),
                    "OLLAMA_DISTRIBUTED_P2P_HOST": self.p2p_host}
        self.env.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
        self.log_path = work / f"{self.name}.log"
        self.args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_by_schedule = False
        self.crashes: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api}"

    def start(self, *args: str) -> None:
        self.args = list(args) or self.args
        cmd = [*CLI, "start", "--data-dir", str(self.data), "--api-port", str(self.api),
               "--web-port", str(free_port()), "--p2p-port", "4001", *self.args]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.killed_by_schedule = False

    def ready(self) -> bool:
        return call(self, "GET", "/health/ready", timeout=2)[0] == 200

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


def call(node: Node, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", node.api, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw) if raw.strip() else None
        except ValueError:
            return r.status, raw.decode(errors="replace")
    except OSError as e:
        return 0, str(e)
    finally:
        conn.close()


def until(what: str, timeout: float, check: Any) -> None:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"chaos: timed out waiting for {what}")
        time.sleep(0.2)


@dataclass
class Result:
    kind: str
    model: str
    entry: str
    start: float
    end: float = 0.0
    outcome: str = ""  # ok | clear | entry-died | hung | unclear
    detail: str = ""
    faults: list[str] = field(default_factory=list)


class Cluster:
    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.nodes = [Node(0, work, MOCK), Node(1, work, MOCK), Node(2, work, MOCK),
                      Node(3, work, {"OLLAMA_DISTRIBUTED_ENGINE_THREADS": "1"})]
        self.down: set[str] = set()  # killed or stopped: not an entry for new requests
        self.active: dict[str, float] = {}  # fault label -> since
        self.deaths: list[tuple[str, float, float]] = []  # node, killed at, back at
        self.lock = threading.Lock()
        self.results: list[Result] = []
        self.stop = threading.Event()

    # ---- set-up ------------------------------------------------------------------

    def form(self) -> None:
        small = self.nodes[2].data
        small.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(small)], check=True)
        first = self.nodes[0]
        first.start()
        until("n0 ready", 60, first.ready)
        token = subprocess.run([*CLI, "cluster", "token", "--data-dir", str(first.data)], capture_output=True,
                               text=True, check=True, env=first.env).stdout.strip()
        for n in self.nodes[1:]:
            n.start("--join", f"{first.p2p_host}:4001", "--token", token)
        for n in self.nodes:
            until(f"{n.name} ready", 90, n.ready)

        def formed() -> bool:
            st = call(first, "GET", "/api/distributed/status")[1]
            return isinstance(st, dict) and len(st.get("active_nodes", [])) == 4 and not st.get("degraded")

        until("four nodes in one cluster", 60, formed)
        status, body = call(first, "POST", "/api/copy", {"source": MODEL, "destination": SPARE})
        assert status == 200, (status, body)
        time.sleep(2)  # adverts: every node sees every holder

    def teardown(self) -> None:
        for n in self.nodes:
            n.signal(signal.SIGCONT)
            n.signal(signal.SIGTERM)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(30)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
        subprocess.run(["umount", "-l", str(self.nodes[2].data)], check=False)

    # ---- workload ----------------------------------------------------------------

    def entry(self) -> Node:
        with self.lock:
            up = [n for n in self.nodes if n.name not in self.down]
        return self.rng.choice(up)

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            kind = rng.choice(["generate", "generate-stream", "chat", "chat-stream", "embed"])
            model = SPARE if rng.random() < 0.15 else MODEL
            node = self.entry()
            with self.lock:
                res = Result(kind, model, node.name, time.time(), faults=sorted(self.active))
            self.one(node, res)
            with self.lock:
                self.results.append(res)

    def one(self, node: Node, res: Result) -> None:
        opts = {"num_predict": 8}
        if res.kind.startswith("generate"):
            path, body = "/api/generate", {"model": res.model, "prompt": "Tell me about boats.", "options": opts}
        elif res.kind.startswith("chat"):
            path, body = "/api/chat", {"model": res.model, "options": opts,
                                       "messages": [{"role": "user", "content": "Hi there"}]}
        else:
            path, body = "/api/embed", {"model": res.model, "input": ["one", "two"]}
        stream = res.kind.endswith("-stream")
        if path != "/api/embed":
            body["stream"] = stream
        conn = http.client.HTTPConnection("127.0.0.1", node.api, timeout=HUNG_S)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read()
            res.end = time.time()
            if r.status != 200:
                err = json.loads(raw).get("error") if raw.strip().startswith(b"{") else None
                res.outcome, res.detail = ("clear" if err else "unclear"), f"{r.status} {err or raw[:200]!r}"
                return
            lines = [json.loads(x) for x in raw.splitlines() if x.strip()]
            last = lines[-1] if lines else {}
            if "error" in last:
                res.outcome, res.detail = "clear", f"stream error: {last['error']}"
            elif (path == "/api/embed" and len(last.get("embeddings", [])) == 2) or last.get("done") is True:
                res.outcome = "ok"
            else:
                res.outcome, res.detail = "unclear", f"no done and no error: {raw[-200:]!r}"
        except TimeoutError:
            res.end, res.outcome, res.detail = time.time(), "hung", f"no answer within {HUNG_S:.0f}s"
        except (OSError, ValueError, http.client.HTTPException) as e:
            res.end = time.time()
            died = any(name == node.name and t0 <= res.end and res.start <= t1 for name, t0, t1 in self.deaths_now())
            res.outcome, res.detail = ("entry-died" if died else "unclear"), f"{type(e).__name__}: {e}"
        finally:
            conn.close()

    def deaths_now(self) -> list[tuple[str, float, float]]:
        with self.lock:
            return [(n, t0, t1 or float("inf")) for n, t0, t1 in self.deaths]

    # ---- faults ------------------------------------------------------------------

    def fault(self, label: str, action: Any, hold: float, undo: Any = None) -> None:
        log(f"fault: {label} for {hold:.0f}s")
        with self.lock:
            self.active[label] = time.time()
        try:
            action()
            time.sleep(hold)
        finally:
            if undo is not None:
                undo()
            with self.lock:
                self.active.pop(label, None)
            log(f"fault over: {label}")

    def kill(self, n: Node) -> None:
        def action() -> None:
            with self.lock:
                self.down.add(n.name)
                n.killed_by_schedule = True
                self.deaths.append((n.name, time.time(), 0.0))
            n.signal(signal.SIGKILL)
            assert n.proc is not None
            n.proc.wait(10)

        def undo() -> None:
            n.start()
            until(f"{n.name} back", 90, n.ready)
            with self.lock:
                self.down.discard(n.name)
                self.deaths[-1] = (n.name, self.deaths[-1][1], time.time())

        self.fault(f"kill -9 {n.name}", action, 4, undo)

    def sigstop(self, n: Node) -> None:
        def action() -> None:
            with self.lock:
                self.down.add(n.name)
            n.signal(signal.SIGSTOP)

        def undo() -> None:
            n.signal(signal.SIGCONT)
            with self.lock:
                self.down.discard(n.name)

        self.fault(f"SIGSTOP {n.name}", action, 5, undo)

    def partition(self, n: Node) -> None:
        def nft(*args: str) -> None:
            subprocess.run(["nft", *args], check=True, capture_output=True)

        def action() -> None:
            nft("add", "table", "inet", "chaos")
            nft("add", "chain", "inet", "chaos", "in", "{ type filter hook input priority 0 ; }")
            nft("add", "rule", "inet", "chaos", "in", "ip", "saddr", n.p2p_host, "udp", "dport", "4001", "drop")
            nft("add", "rule", "inet", "chaos", "in", "ip", "daddr", n.p2p_host, "udp", "sport", "4001", "drop")

        self.fault(f"partition {n.name}", action, 3, lambda: nft("delete", "table", "inet", "chaos"))

    def full_disk(self) -> None:
        n = self.nodes[2]
        filler = n.data / "filler"

        def action() -> None:
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                block = b"\0" * (1 << 20)
                while True:
                    f.write(block)

        self.fault(f"full disk {n.name}", action, 5, lambda: filler.unlink(missing_ok=True))

    def keep_alive_0(self, n: Node) -> None:
        self.fault(f"keep_alive 0 at {n.name}",
                   lambda: call(n, "POST", "/api/generate", {"model": MODEL, "keep_alive": 0}), 1)

    def delete_recreate(self, n: Node) -> None:
        self.fault(f"delete and re-create {SPARE} at {n.name}",
                   lambda: call(n, "DELETE", "/api/delete", {"model": SPARE}), 2,
                   lambda: call(n, "POST", "/api/copy", {"source": MODEL, "destination": SPARE}))

    def rebalance(self, n: Node) -> None:
        self.fault(f"rebalance at {n.name}", lambda: call(n, "POST", "/api/distributed/rebalance", {}), 1)

    def schedule(self, duration: float) -> list[tuple[float, str, int]]:
        kinds = ["kill", "sigstop", "partition", "full_disk", "keep_alive_0", "delete_recreate", "rebalance"]
        plan: list[str] = []
        while len(plan) < int(duration // 9):
            batch = kinds[:]
            self.rng.shuffle(batch)
            plan += batch
        out, t = [], 6.0
        for kind in plan[: int(duration // 9)]:
            out.append((t, kind, self.rng.randrange(len(self.nodes))))
            t += self.rng.uniform(7, 11)
        return [x for x in out if x[0] < duration - 8]

    def run_faults(self, plan: list[tuple[float, str, int]], t0: float) -> None:
        for at, kind, i in plan:
            while time.time() - t0 < at and not self.stop.is_set():
                time.sleep(0.1)
            node = self.nodes[i]
            getattr(self, kind)(node) if kind != "full_disk" else self.full_disk()

    def watch(self) -> None:
        """A node that exits without the schedule killing it crashed."""
        while not self.stop.is_set():
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None and not n.killed_by_schedule:
                    n.crashes.append(f"exited with {n.proc.returncode}")
                    log(f"CRASH: {n.name} exited with {n.proc.returncode}")
                    n.killed_by_schedule = True  # counted once; restarted so the run goes on
                    n.start()
            time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=120)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    c = Cluster(work, a.seed)
    log(f"chaos seed {a.seed}, {a.duration:.0f}s, {a.clients} clients")
    try:
        c.form()
        plan = c.schedule(a.duration)
        log("schedule: " + ", ".join(f"{t:.0f}s {k} n{i}" for t, k, i in plan))
        threads = [threading.Thread(target=c.client, args=(a.seed * 100 + k,), daemon=True)
                   for k in range(a.clients)]
        watcher = threading.Thread(target=c.watch, daemon=True)
        t0 = time.time()
        for t in [*threads, watcher]:
            t.start()
        c.run_faults(plan, t0)
        while time.time() - t0 < a.duration:
            time.sleep(0.2)
        c.stop.set()
        for t in threads:
            t.join(HUNG_S + 10)
    finally:
        c.stop.set()
        c.teardown()
    return report(c)


def report(c: Cluster) -> int:
    rs = c.results
    by = {k: sum(r.outcome == k for r in rs) for k in ("ok", "clear", "entry-died", "hung", "unclear")}
    crashes = sum(len(n.crashes) for n in c.nodes)
    for n in c.nodes:
        text = n.log_path.read_text(errors="replace")
        for needle in ("Fatal Python error", "core dumped", "Aborted", "Segmentation fault"):
            if needle in text:
                crashes += 1
                print(f"{n.name}'s log: {needle}")
    # a request of the bundled model (every node holds it) that began after a
    # node's death, at a live entry node, must not fail: it had not started
    late = [r for r in rs if r.model == MODEL and r.outcome not in ("ok", "entry-died")
            and any(t0 <= r.start <= t1 and r.entry != name for name, t0, t1 in c.deaths_now())]
    table = {"requests sent": len(rs), "completed": by["ok"], "failed with a clear status": by["clear"],
             "entry node died under the client": by["entry-died"], "failed without a clear status": by["unclear"],
             "hung": by["hung"], "node crashes not caused by the schedule": crashes,
             "not started when a node died, still failed": len(late)}
    width = max(map(len, table))
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in table.items()))
    for r in rs:
        if r.outcome != "ok":
            print(f"  {r.outcome:<10} {r.kind:<15} {r.model:<14} at {r.entry}: {r.detail[:160]} "
                  f"(faults: {', '.join(r.faults) or 'none'})")
    print("CHAOS-TABLE " + json.dumps(table))
    bad = by["hung"] or by["unclear"] or crashes or late or by["ok"] == 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
