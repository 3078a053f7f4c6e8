"""`ollama-distributed start` with one fault planted, for tests of what the
node does when a peer misbehaves or one of its own loops dies. The product
code runs unchanged; only the named method is wrapped.

    python -m tests.cluster.patched_node MODE start --data-dir ... (start's options)

MODE hostile-advert: every advert this node publishes carries wrong types and
ranges (what a buggy or hostile peer would send).
MODE advert-dies: the supervised advert loop ends for good after three passes.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ollama_distributed import supervise
from ollama_distributed.cli.main import cli
from ollama_distributed.cluster.service import ClusterService

HOSTILE = {"in_flight": -5, "queue_depth": "many", "max_queue": None, "models": [None, "../../etc"],
           "loaded": {"x": 1}, "busy": 7, "max_loaded_models": 10**30, "resources": {"cpu": "hot"}}


def hostile_advert() -> None:
    honest = ClusterService.publish_advert

    def publish(self: ClusterService, advert: dict[str, Any]) -> None:
        honest(self, {**advert, **HOSTILE})

    ClusterService.publish_advert = publish  # type: ignore[method-assign]


def advert_dies() -> None:
    loop = supervise.Supervisor.loop

    def dying(self: supervise.Supervisor, name: str, once: Callable[[], Awaitable[None]],
              interval: Callable[[], float]) -> Any:
        if name != "advert":
            return loop(self, name, once, interval)
        passes = [0]

        def after() -> float:
            passes[0] += 1
            if passes[0] > 3:
                raise RuntimeError("planted: the advert loop's scaffolding broke")
            return interval()

        return loop(self, name, once, after)

    supervise.Supervisor.loop = dying  # type: ignore[method-assign]


if __name__ == "__main__":
    {"hostile-advert": hostile_advert, "advert-dies": advert_dies}[sys.argv[1]]()
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    cli()
