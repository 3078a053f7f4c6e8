"""sd_notify as systemd sees it: a unix datagram socket as $NOTIFY_SOCKET
receives READY=1 (only once the API answers), STATUS= lines as state changes,
WATCHDOG=1 every WATCHDOG_USEC/2, RELOADING=1 then READY=1 on SIGHUP (with the
new log level and auth tokens in force), and STOPPING=1 on SIGTERM."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import MODEL, NodeProc, start_node


class NotifySocket:
    """What systemd's end of $NOTIFY_SOCKET would record."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="odn-", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._recv, daemon=True)
        self.thread.start()

    def _recv(self) -> None:
        while not self._stop:
            try:
                raw = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in raw.decode().splitlines() if "=" in line)
            with self.cond:
                self.messages.append((time.monotonic(), fields))
                self.cond.notify_all()

    def wait(self, pred: Callable[[dict[str, str]], bool], after: int = 0, timeout: float = 30) -> int:
        """Index of the first message from `after` on that satisfies pred."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.messages)):
                    if pred(self.messages[i][1]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such notification; got {[m for _, m in self.messages[after:]]}")
                self.cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


def get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def status_of(node: NodeProc, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(node.url + "/api/distributed/status", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def open_ws(node: NodeProc, token: str | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", node.web_port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    proto = f"Sec-WebSocket-Protocol: bearer.{token}\r\n" if token else ""  # how the dashboard proves its key
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{proto}\r\n").encode())
    assert b"101" in s.recv(4096)
    return s


def test_notify_lifecycle(notify: NotifySocket, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("logging: {level: info}\napi: {auth_tokens: []}\n")
    node = start_node(tmp_path, "--config", str(cfg), "--engine", "mock", wait=False,
                      env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "300000"})
    try:
        # === READY=1 only once the API answers, after the models are registered
        ready = notify.wait(lambda m: m.get("READY") == "1")
        assert get(node.url + "/health/ready") == 200
        # the P2P listener is bound too
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError):
            udp.bind(("0.0.0.0", node.p2p_port))
        before = [m for _, m in notify.messages[:ready]]
        assert {"STATUS": "registering models"} in before
        assert notify.messages[ready][1]["STATUS"].startswith("serving on http://")

        # === WATCHDOG=1 about every 150 ms (WATCHDOG_USEC/2)
        first = notify.wait(lambda m: m.get("WATCHDOG") == "1", after=ready)
        time.sleep(1.6)
        pings = [t for t, m in notify.messages[first:] if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 6, len(pings)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.6, gaps

        # === STATUS= follows the state: a served request shows up
        mark = len(notify.messages)
        body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
        with urllib.request.urlopen(urllib.request.Request(node.url + "/api/generate", data=body),
                                    timeout=30) as r:
            assert json.loads(r.read())["done"]
        # every request on the API counts (the readiness polls too), the generate among them
        notify.wait(lambda m: "STATUS" in m and "loaded: smollm2" in m["STATUS"]
                    and int(re.search(r"(\d+) served", m["STATUS"]).group(1)) >= 1,  # type: ignore[union-attr]
                    after=mark, timeout=10)

        # === SIGHUP: RELOADING=1, then READY=1, and the new keys are in force
        assert get(node.url + "/api/tags") == 200
        open_ws(node).close()
        time.sleep(0.3)
        assert "dashboard client" not in node.log()  # info level: no debug lines yet
        stats = status_of(node)["scheduler_stats"]
        assert stats["num_parallel_auto"] is True and stats["num_parallel"] >= 1  # chosen from memory
        cfg.write_text("logging: {level: debug}\napi: {auth_tokens: [s3cret]}\nengine: {num_parallel: 2}\n")
        mark = len(notify.messages)
        node.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait(lambda m: m.get("RELOADING") == "1", after=mark)
        assert int(notify.messages[reloading][1]["MONOTONIC_USEC"]) > 0
        notify.wait(lambda m: m.get("READY") == "1", after=reloading)
        assert get(node.url + "/api/tags") == 401
        assert get(node.url + "/api/tags", token="s3cret") == 200
        assert get(node.url + "/health/ready") == 200  # probes stay open
        stats = status_of(node, "s3cret")["scheduler_stats"]
        assert stats["num_parallel"] == 2 and stats["num_parallel_auto"] is False  # a scheduler knob
        open_ws(node, token="s3cret").close()
        deadline = time.monotonic() + 5
        while "dashboard client" not in node.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "DEBUG" in node.log() and "dashboard client" in node.log()

        # === a broken config on SIGHUP keeps the running one, and says so
        cfg.write_text("api: {auth_tokens: [s3cret], prot: 1}\n")
        mark = len(notify.messages)
        node.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait(lambda m: m.get("RELOADING") == "1", after=mark)
        back = notify.wait(lambda m: m.get("READY") == "1", after=reloading)
        assert "reload failed" in notify.messages[back][1]["STATUS"]
        assert get(node.url + "/api/tags") == 401
        assert "api.prot" in node.log()

        # === SIGTERM: STOPPING=1 and a clean exit
        mark = len(notify.messages)
        assert node.stop(signal.SIGTERM) == 0
        notify.wait(lambda m: m.get("STOPPING") == "1", after=mark, timeout=5)
    finally:
        node.stop()


def test_no_notify_socket_no_watchdog(tmp_path: Path) -> None:
    """Outside systemd nothing is sent and nothing breaks (WATCHDOG_USEC alone is ignored)."""
    node = start_node(tmp_path, "--engine", "mock", env={"WATCHDOG_USEC": "100000"})
    try:
        assert get(node.url + "/health") == 200
    finally:
        assert node.stop() == 0
    assert "Traceback" not in node.log()
