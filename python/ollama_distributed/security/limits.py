"""Per-key limits: token buckets for requests per minute and tokens per minute.

A bucket holds up to a minute's allowance and refills continuously. Requests
take one unit before they run; tokens (prompt + generated) are known only when
a request ends, so they are taken then and may drive the bucket below zero,
which refuses the key's next requests until it refills. Use at the other
entry nodes (learned from their adverts, about once a second) is taken from
the same buckets, and each node's burst is the allowance divided by the alive
nodes, so across the cluster a key gets its allowance plus at most what the
other nodes admit between two adverts.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Set by the HTTP guard for the request's task; the dispatcher calls it with
# the request's prompt + generated tokens when the request ends.
charge_tokens: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "charge_tokens", default=None)


def record_tokens(n: int) -> None:
    """Charge `n` tokens to the key of the request running in this task, if any."""
    charge = charge_tokens.get()
    if charge is not None and n > 0:
        charge(n)


@dataclass
class Bucket:
    """Refills at per_minute / 60 a second up to `capacity` (the burst a node
    may admit before it hears of the others' use: per_minute / entry nodes)."""

    per_minute: int
    capacity: float = 0.0
    level: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            self.capacity = float(self.per_minute)
        self.level = self.capacity  # full at first use

    def resize(self, capacity: float) -> None:
        self.capacity = max(1.0, capacity)
        self.level = min(self.level, self.capacity)

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def take(self, n: float, now: float | None = None, force: bool = False) -> float:
        """Take `n` units; 0.0 when taken, else the seconds until they could be.
        `force` takes them anyway (tokens already spent)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if force or self.level >= n:
            self.level -= n
            return 0.0
        missing = min(n, self.capacity) - self.level
        return missing * 60.0 / self.per_minute

    def wait(self, now: float | None = None) -> float:
        """Seconds until the bucket is above zero (0.0 when it is)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if self.level > 0:
            return 0.0
        return (1e-9 - self.level) * 60.0 / self.per_minute


def retry_after(seconds: float) -> int:
    """Retry-After in whole seconds, never 0."""
    return max(1, math.ceil(seconds))
