"""The third-party routers the benches compare against, installed and started
the same way by every bench that uses them (prefix_routing.py, peers.py).

LiteLLM's proxy and ollama-herd live in their own venv, bench/.venv-alt
(created on first use, pinned versions so that runs compare), and listen on
127.0.0.1 only. Each starter is a context manager that yields the router's
base URL and stops every process it started; it raises `Unavailable` with the
reason when the tool cannot be installed or does not come up, so that the
bench prints that row as unavailable instead of numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALT_VENV = REPO / "bench" / ".venv-alt"
# The versions issue 17's table was measured with; pinned so runs compare.
LITELLM = "litellm[proxy]==1.108.7"
HERD = "ollama-herd==0.11.4"
BENCH_KEY = "sk-" + secrets.token_hex(16)  # LiteLLM's master key, for this run only


class Unavailable(RuntimeError):
    """The tool cannot be installed or started here; the message says why."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data: bytes = r.read()
        return data


def until(what: str, timeout: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def alt_python() -> Path:
    """bench/.venv-alt's python with LiteLLM's proxy and ollama-herd, installed on first use."""
    py = ALT_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ALT_VENV)], check=True)
    missing = [spec for spec, mod in ((LITELLM, "litellm.proxy.proxy_server"), (HERD, "herd"))
               if subprocess.run([str(py), "-c", f"import {mod}"], capture_output=True).returncode != 0]
    if missing:
        out = subprocess.run([str(py), "-m", "pip", "install", "-q", *missing], capture_output=True, text=True)
        if out.returncode != 0:
            raise Unavailable(f"pip install {' '.join(missing)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return py


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


@contextlib.contextmanager
def litellm(py: Path, tmp: Path, model: str, deployments: list[tuple[str, str]],
            strategy: str = "simple-shuffle", name: str = "litellm",
            ) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """LiteLLM's proxy (one worker) serving `model` from `deployments`, each a
    (litellm model, api_base) pair such as ("ollama_chat/m", url) or
    ("openai/m", url + "/v1"). Clients send `BENCH_KEY` as their bearer token.
    Yields the proxy's URL and its process."""
    cfg = tmp / f"{name}.yaml"
    body = ""
    for target, base in deployments:
        body += f"  - model_name: {model}\n    litellm_params:\n      model: {target}\n      api_base: {base}\n"
        if target.startswith("openai/"):
            body += "      api_key: unused\n"  # the openai provider wants one; the nodes ignore it
    cfg.write_text(f"model_list:\n{body}router_settings:\n  routing_strategy: {strategy}\n")
    port = free_port()
    log_path = tmp / f"{name}.log"
    # the proxy refuses to start without a master key; the client sends it
    proc = subprocess.Popen([str(py.parent / "litellm"), "--config", str(cfg), "--port", str(port),
                             "--host", "127.0.0.1", "--num_workers", "1"],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": BENCH_KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            until("LiteLLM ready", 120, lambda: proc.poll() is None and get(url + "/health/liveliness") != b"")
        except RuntimeError as e:
            tail = log_path.read_text(errors="replace")[-300:]
            raise Unavailable(f"LiteLLM did not start: {e}; log: {tail!r}") from None
        yield url, [proc]
    finally:
        _stop([proc])


@contextlib.contextmanager
def herd(py: Path, tmp: Path, node_urls: list[str]) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """ollama-herd's router (`herd`) with one `herd-node` agent per node, each
    pointed at its node's Ollama API (--ollama-host) and at the router
    directly (no mDNS); its state under `tmp` as HOME. Yields the router's URL
    and its processes (the router first)."""
    router, agent = py.parent / "herd", py.parent / "herd-node"
    if not router.exists() or not agent.exists():
        raise Unavailable("ollama-herd installed no `herd` / `herd-node` command")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HOME": str(tmp)}
    log_path = tmp / "herd.log"
    log = open(log_path, "wb")
    procs = [subprocess.Popen([str(router), "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
                              stdout=log, stderr=subprocess.STDOUT, env=env)]
    try:
        try:
            until("herd ready", 120, lambda: procs[0].poll() is None and get(url + "/api/version") != b"")
            for i, n in enumerate(node_urls):
                procs.append(subprocess.Popen([str(agent), "--node-id", f"bench-{i}", "--ollama-host", n,
                                               "--router-url", url], stdout=log, stderr=subprocess.STDOUT, env=env))

            def online() -> bool:
                return int(json.loads(get(url + "/fleet/status"))["fleet"]["nodes_online"]) == len(node_urls)

            until("herd sees every node online", 120, online)
        except RuntimeError as e:
            tail = log_path.read_text(errors="replace")[-400:]
            raise Unavailable(f"ollama-herd did not come up: {e}; log: {tail!r}") from None
        time.sleep(3)  # a few heartbeats: the router's scores have data
        yield url, procs
    finally:
        _stop(procs)
