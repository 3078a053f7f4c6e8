"""The watchdog pings only after a round trip into the Rust core: a wedged
core (a ping that never answers) withholds WATCHDOG=1, so systemd restarts us."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest
from ollama_distributed import systemd


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    d = tempfile.mkdtemp(prefix="odw-", dir="/tmp")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()
    os.unlink(path)
    os.rmdir(d)


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def run_watchdog(seconds: float) -> None:
    n = systemd.Notifier()
    assert n.enabled
    n.start_watchdog()
    await asyncio.sleep(seconds)
    await n.stop_watchdog()


async def test_pings_after_core_round_trips(notify_socket: socket.socket) -> None:
    await run_watchdog(0.5)
    pings = [m for m in drain(notify_socket) if m == "WATCHDOG=1"]
    assert len(pings) >= 5


async def test_wedged_core_withholds_pings(notify_socket: socket.socket,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    class Wedged:
        @staticmethod
        async def ping() -> None:
            await asyncio.Event().wait()  # never answers

    monkeypatch.setattr(systemd, "_core", Wedged)
    await run_watchdog(0.5)
    assert "WATCHDOG=1" not in drain(notify_socket)


def test_watchdog_for_another_pid_is_not_ours(notify_socket: socket.socket,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.Notifier.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.Notifier.watchdog_interval() == pytest.approx(0.05)
