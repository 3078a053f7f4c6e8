"""Scripted peers for tests of the dispatcher's routing: a real Dispatcher on
the mock engine whose `remote` is a script, with every other node of the
cluster holding (and having loaded) the model `m:latest`. The script decides
what each peer streams; the base records whom the dispatcher asked, and with
which request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import Any

from ollama_distributed.config import Config
from ollama_distributed.dispatch import Dispatcher
from ollama_distributed.engines.mock import MockEngine
from ollama_distributed.metrics import Metrics
from ollama_distributed.models.store import Store

MODEL = "m:latest"
# Longer than any test may run: a peer that hangs is ended by a timeout, never by this.
HANG_S = 3600


class ScriptedPeers:
    """The dispatcher's `remote`. A subclass's `forward` calls `record` first,
    then streams what its script says for that node."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    @property
    def asked(self) -> list[str]:
        """The nodes asked, in order."""
        return [n for n, _ in self.requests]

    def record(self, node_id: str, request: dict[str, Any]) -> None:
        self.requests.append((node_id, request))

    def forward(self, node_id: str, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        raise NotImplementedError


async def hang() -> None:
    """A peer that stops sending."""
    await asyncio.sleep(HANG_S)


def routed_dispatcher(tmp_path: Path, peers: ScriptedPeers, nodes: Iterable[str], **sched: Any) -> Dispatcher:
    """Node `a` with `peers` as its remote and `nodes` as the holders of MODEL,
    the first with the fewest requests in flight (so it is asked first), then
    the next; `sched` sets scheduler config (timeouts, retries, limits)."""
    cfg = Config()
    cfg.engine.kind = "mock"
    for k, v in sched.items():
        setattr(cfg.scheduler, k, v)
    store = Store(tmp_path / "models")
    store.ensure()
    d = Dispatcher(cfg, "a", store, MockEngine(cfg.engine), Metrics())
    d.remote = peers
    now = int(time.time() * 1000)
    for i, node in enumerate(nodes):
        d.scheduler.update_node(node, True, now, [MODEL], [MODEL], i, 0, 8, max_loaded_models=3, busy=[])
    return d
