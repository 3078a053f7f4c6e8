"""How many requests a model runs at once when `engine.num_parallel` is 0 (auto).

A slot of the llama.cpp engine is a context of its own: the weights are mmapped
once and shared, so a slot costs its KV cache (layers x context x KV heads x
head size x 2 for K and V x 2 bytes at f16) plus llama.cpp's compute buffers.
With one slot, Open WebUI's chat-title request (up to 1,000 tokens) made the
user's streamed answer wait behind it; with a few, a short interactive request
starts beside a long one. Auto takes as many slots as fit in MEMORY_FRACTION of
the memory available now, between 1 and AUTO_MAX. An upstream engine (Ollama,
an OpenAI server) has its own queue: auto lets AUTO_MAX requests through to it.
A number in the config always wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config import EngineSection
from ..models import gguf_info
from ..models.catalog import find_default_gguf
from ..models.store import Store

logger = logging.getLogger(__name__)

# More slots than this on a CPU node only split the same cores thinner; four
# let a title, tags and an answer (Open WebUI's three at once) all start.
AUTO_MAX = 4
# Of the memory available at start: the rest is for other loaded models
# (engine.max_loaded_models), the page cache that holds the mmapped weights,
# and whatever else runs on the machine.
MEMORY_FRACTION = 0.25
# llama.cpp's compute and output buffers per context, on top of the KV cache
# (a small model at n_batch 512 reserves tens of MiB; rounded up).
SLOT_OVERHEAD = 64 << 20
KV_BYTES = 2  # f16 K and V, llama.cpp's default cache type


def kv_bytes_per_slot(meta: dict[str, Any], num_ctx: int) -> int:
    """The KV cache one context of `num_ctx` tokens takes, from GGUF metadata;
    0 when the metadata lacks what it takes to tell."""
    arch = str(meta.get("general.architecture") or "")
    layers = meta.get(f"{arch}.block_count")
    heads = meta.get(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    width = meta.get(f"{arch}.embedding_length")
    if isinstance(kv_heads, list):  # per-layer counts (some architectures): the largest
        kv_heads = max((h for h in kv_heads if isinstance(h, int)), default=None)
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(kv_heads, int)
            and isinstance(width, int) and min(layers, heads, kv_heads, width) > 0):
        return 0
    key_len = meta.get(f"{arch}.attention.key_length")
    value_len = meta.get(f"{arch}.attention.value_length")
    head = width // heads
    k = key_len if isinstance(key_len, int) and key_len > 0 else head
    v = value_len if isinstance(value_len, int) and value_len > 0 else head
    return int(layers * num_ctx * kv_heads * (k + v) * KV_BYTES)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), 0 when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def slots_for(per_slot: int, available: int) -> int:
    """Slots that fit `available` bytes at `per_slot` each, within 1..AUTO_MAX."""
    if per_slot <= 0 or available <= 0:
        return 1
    return max(1, min(AUTO_MAX, int(available * MEMORY_FRACTION) // per_slot))


def _slot_of(path: Path, num_ctx: int) -> int:
    try:
        meta = gguf_info.read(path)["model_info"]
    except (OSError, ValueError) as e:
        logger.debug("no KV size for %s: %s", path, e)
        return 0
    kv = kv_bytes_per_slot(meta, num_ctx)
    return kv + SLOT_OVERHEAD if kv else 0


def _largest_slot(store: Store, num_ctx: int) -> int:
    """The largest KV cache per slot among the store's models (bytes, with
    overhead); on a first start, before the bundled model is registered, the
    bundled model's."""
    paths = [rec.model_path for rec in store.records() if rec.model_path is not None]
    if not paths:
        bundled = find_default_gguf()
        paths = [bundled] if bundled is not None else []
    return max((_slot_of(p, num_ctx) for p in paths), default=0)


def resolve(cfg: EngineSection, store: Store | None) -> int:
    """The number of slots per model: the config's, else (0) chosen as above."""
    if cfg.num_parallel > 0:
        return cfg.num_parallel
    if cfg.kind in ("ollama", "openai") or store is None:
        return AUTO_MAX
    per_slot = _largest_slot(store, cfg.num_ctx)
    available = available_memory()
    n = slots_for(per_slot, available)
    logger.info("engine.num_parallel auto: %d slot(s) per model (KV cache and buffers %.0f MiB a slot, "
                "%.0f MiB available)", n, per_slot / (1 << 20), available / (1 << 20))
    return n
