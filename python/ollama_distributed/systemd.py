"""systemd glue: sd_notify states and the watchdog.

The watchdog pings only after a round trip through the Rust core's runtime
(`_core.ping`) and the event loop, so a wedged core or a blocked loop stops the
pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import sdnotify  # type: ignore[import-untyped]

from . import _core, env

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(env.get(env.NOTIFY_SOCKET))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        self._watchdog: asyncio.Task[None] | None = None

    def send(self, *lines: str) -> None:
        if self._n is not None:
            self._n.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        now_us = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send("RELOADING=1", f"MONOTONIC_USEC={now_us}", "STATUS=reloading configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    @staticmethod
    def watchdog_interval() -> float | None:
        usec = env.get(env.WATCHDOG_USEC)
        if not usec:
            return None
        pid = env.get(env.WATCHDOG_PID)
        if pid and pid != str(os.getpid()):
            return None
        try:
            return max(int(usec) / 2e6, 0.05)
        except ValueError:
            return None

    def start_watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping while `healthy()` holds (no supervised task has died) and the core answers."""
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        self._watchdog = asyncio.create_task(self._ping(interval, healthy), name="systemd-watchdog")

    async def _ping(self, interval: float, healthy: Callable[[], bool]) -> None:
        while True:
            try:
                await asyncio.wait_for(_core.ping(), timeout=interval)
            except Exception:
                logger.error("the Rust core did not answer within %.1fs; withholding the watchdog ping",
                             interval)
            else:
                if healthy():
                    self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def stop_watchdog(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
