"""Shared fixtures: real node processes on free 127.0.0.1 ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "ollama_distributed.cli.main"]
MODEL = "smollm2:135m"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProc:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    api_port: int
    web_port: int
    p2p_port: int
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def start_node(tmp: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True,
               data_dir: Path | None = None, timeout: float = 60, host: str = "127.0.0.1",
               cli: list[str] | None = None) -> NodeProc:
    data_dir = data_dir or (tmp / "data")
    api, web, p2p = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    log_path = tmp / f"node-{api}.log"
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env.pop("OLLAMA_DISTRIBUTED_CONFIG", None)
    full_env.setdefault("HOME", str(tmp))  # no user config leaks into tests
    cmd = [*(cli or CLI), "start", "--data-dir", str(data_dir), "--api-port", str(api), "--web-port", str(web),
           "--p2p-port", str(p2p), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=tmp)
    node = NodeProc(proc, data_dir, api, web, p2p, log_path, host=host)
    if wait:
        wait_ready(node, timeout)
    return node


def wait_ready(node: NodeProc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise AssertionError(f"node exited with {node.proc.returncode}:\n{node.log()}")
        try:
            with urllib.request.urlopen(node.url + "/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    node.stop()
    raise AssertionError(f"node not ready within {timeout}s:\n{node.log()}")


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One real node on the real llama.cpp engine, shared by the integration tests."""
    tmp = tmp_path_factory.mktemp("node")
    n = start_node(tmp, "--log-level", "debug")
    yield n
    n.stop()


@pytest.fixture
def fresh_node(tmp_path: Path) -> Iterator[NodeProc]:
    n = start_node(tmp_path)
    yield n
    n.stop()
