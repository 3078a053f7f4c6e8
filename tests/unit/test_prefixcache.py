"""The pure parts of the warm-prefix cache (engines/prefixcache.py): prefix
lengths and the choice of slot. The cache itself runs against the real
engine in tests/integration/test_prompt_cache.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ollama_distributed.engines.prefixcache import common_prefix, pick_slot, prefix_ids


@dataclass
class Context:
    """What pick_slot reads of a llama.cpp context: the ids its KV holds."""

    held: list[int]
    input_ids: np.ndarray = field(init=False)
    n_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        # as Llama keeps them: an n_ctx-long array, valid up to n_tokens
        self.input_ids = np.zeros(64, dtype=np.intc)
        self.input_ids[: len(self.held)] = self.held
        self.n_tokens = len(self.held)


def test_common_prefix() -> None:
    a = prefix_ids([1, 2, 3, 4])
    assert common_prefix(a, prefix_ids([1, 2, 3, 4])) == 4
    assert common_prefix(a, prefix_ids([1, 2, 9, 4])) == 2
    assert common_prefix(a, prefix_ids([1, 2])) == 2  # a strict prefix
    assert common_prefix(a, prefix_ids([1, 2, 3, 4, 5, 6])) == 4
    assert common_prefix(a, prefix_ids([7])) == 0
    assert common_prefix(a, prefix_ids([])) == 0


def test_pick_slot_prefers_the_longest_shared_prefix_among_idle_slots() -> None:
    slots = {0: Context([1, 2, 3]), 1: Context([5, 6, 7, 8]), 2: Context([5, 6, 7, 8, 9])}
    prompt = prefix_ids([5, 6, 7, 8, 9, 10])
    assert pick_slot(slots, {0, 1, 2}, 0, prompt) == 2
    assert pick_slot(slots, {0, 1}, 0, prompt) == 1  # slot 2 is busy: its context is not offered
    assert pick_slot(slots, {0}, 0, prompt) == 0
    # a tie keeps the slot's own context (its conversation stays with it)
    assert pick_slot({0: Context([5, 6]), 1: Context([5, 6])}, {0, 1}, 0, prefix_ids([5, 6, 1])) == 0
    # tokens past n_tokens are stale, not held
    stale = Context([5, 6, 7, 8, 9])
    stale.n_tokens = 1
    assert pick_slot({0: Context([5, 6]), 1: stale}, {0, 1}, 0, prompt) == 0
