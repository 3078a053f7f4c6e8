"""Per-key limits: token buckets for requests per minute and tokens per minute.

A bucket holds up to a minute's allowance and refills continuously. Requests
take one unit before they run; tokens (prompt + generated) are known only when
a request ends, so they are taken then and may drive the bucket below zero,
which refuses the key's next requests until it refills. Use at the other
entry nodes (learned from their adverts, about once a second) is taken from
the same buckets, so a key's limit holds across the cluster within what the
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
    per_minute: int
    level: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = float(self.per_minute)  # full at first use

    def _refill(self, now: float) -> None:
        cap = float(self.per_minute)
        self.level = min(cap, self.level + (now - self.stamp) * cap / 60.0)
        self.stamp = now

    def take(self, n: float, now: float | None = None, force: bool = False) -> float:
        """Take `n` units; 0.0 when taken, else the seconds until they could be.
        `force` takes them anyway (tokens already spent)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if force or self.level >= n:
            self.level -= n
            return 0.0
        missing = min(n, float(self.per_minute)) - self.level
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
