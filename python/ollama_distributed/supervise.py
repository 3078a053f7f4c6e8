"""Long-lived background tasks, supervised.

Every loop of the node (the advert loop, replication, the keep-alive reaper,
the cluster's inbound loop) runs under a `Supervisor`: a pass that raises is
logged with its traceback and the loop goes on; a task that ends for good
while the node runs (an exception outside a pass, or a loop that returns) is
recorded by name. The node then reports itself degraded in `/health` and
`status`, and the systemd watchdog withholds its pings, so systemd restarts a
node that can no longer do its job instead of leaving it half alive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)


class Supervisor:
    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.dead: dict[str, str] = {}  # task name -> why it ended
        self.failed_passes: collections.Counter[str] = collections.Counter()
        self._owned: set[str] = set()  # started here, so cancelled here on stop
        self._stopping = False

    @property
    def healthy(self) -> bool:
        return not self.dead

    def loop(self, name: str, once: Callable[[], Awaitable[None]],
             interval: Callable[[], float]) -> asyncio.Task[Any]:
        """Run `once()` every `interval()` seconds; a failing pass is logged, not fatal."""

        async def run() -> None:
            while True:
                try:
                    await once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.failed_passes[name] += 1
                    logger.exception("%s: a pass failed (%d so far); the loop goes on",
                                     name, self.failed_passes[name])
                await asyncio.sleep(interval())

        return self.watch(name, run())

    def watch(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Start `coro` as a task that must run until the node stops."""
        task = self.adopt(name, asyncio.create_task(coro, name=name))
        self._owned.add(name)
        return task

    def adopt(self, name: str, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Watch a task started elsewhere (the cluster's inbound loop, the reaper)."""
        self.tasks[name] = task
        task.add_done_callback(lambda t: self._ended(name, t))
        return task

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "it returned"
        self.dead[name] = why
        logger.error("background task %s ended for good (%s): the node reports degraded and withholds "
                     "the systemd watchdog so that systemd restarts it", name, why,
                     exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)

    async def stop(self) -> None:
        """Cancel the tasks started here; every task's end from here on is expected
        (adopted ones are stopped by their owners)."""
        self._stopping = True
        owned = [t for n, t in self.tasks.items() if n in self._owned]
        for task in owned:
            task.cancel()
        for task in owned:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
