"""What the dispatcher tells the fair queue (rust/scheduler/fair.rs) about a
request before it runs, and what it shows of the queue.

The queue charges a request's tokens (prompt + generated) to its tenant on
admission, before they are known, and corrects the charge on release with
the counts of the final chunk.
"""

from __future__ import annotations

import time
from typing import Any

from . import _core
from .config import Config
from .engines.base import InferenceRequest

# The prompt at about this many characters a token (English text under a BPE
# vocabulary), plus num_predict, or OUTPUT_ESTIMATE generated tokens when the
# request sets no limit.
CHARS_PER_TOKEN = 4
OUTPUT_ESTIMATE = 256


def estimate_tokens(req: InferenceRequest) -> int:
    """Tokens (prompt + generated) `req` will take, guessed before it runs."""
    chars = len(req.prompt) + len(req.system or "") + len(req.suffix) + sum(len(t) for t in req.input)
    for m in req.messages:
        content = m.get("content") if isinstance(m, dict) else None
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
    prompt = chars // CHARS_PER_TOKEN + len(req.continuation)
    if req.kind == "embed":
        return prompt
    n = req.options.get("num_predict")
    out = int(n) if isinstance(n, int | float) and not isinstance(n, bool) and 0 < n < 1 << 20 else OUTPUT_ESTIMATE
    return prompt + out


def queue_view(scheduler: _core.Scheduler, cfg: Config, node_id: str) -> dict[str, Any]:
    """A node's requests running and queued, per model (slot key), in the
    order the queue will serve them, and its tenants' counters."""
    now = int(time.monotonic() * 1000)
    models: dict[str, dict[str, Any]] = {}
    for key, _ticket, tenant, priority, running, n, tokens, age in scheduler.queue(now):
        model, _, kind = key.partition("#")
        m = models.setdefault(key, {"model": model, "kind": kind or "generate", "running": [], "queued": []})
        row: dict[str, Any] = {"tenant": tenant, "priority": priority, "age_s": round(age / 1000, 3),
                               "tokens_estimated": tokens}
        if running:
            m["running"].append({**row, "slot": n})
        else:
            m["queued"].append({**row, "position": n})
    tenants = [{"tenant": name, "virtual_tokens": round(counter, 1), "queued": queued, "running": running}
               for name, counter, queued, running in scheduler.tenants()]
    e = cfg.engine
    return {"node": node_id, "num_parallel": e.num_parallel, "max_queue": e.max_queue,
            "queue_depth": scheduler.queue_depth(), "in_flight": scheduler.total_in_flight(),
            "tenant_queue_share": cfg.scheduler.tenant_queue_share,
            "batch_promote_after_s": cfg.scheduler.batch_promote_after_s,
            "models": list(models.values()), "tenants": tenants}
