"""Warm prompt prefixes for the llama.cpp engine: several KV states per model.

One KV cache per slot is not enough when a node serves several tenants: each
tenant's long system prompt pushes the other's out and every request pays
for its whole prompt again. `PromptCache` keeps copies of contexts' KV states
(llama.cpp's sequence state, `llama_state_seq_get_data`, held in
llama-cpp-python's `LlamaState`) within one byte budget for the whole engine
(`engine.prompt_cache_mib`), least recently used first out, the way
llama-server's prompt cache and llama-cpp-python's `LlamaRAMCache` do.

A request then runs like this (`LlamaCppEngine._generate_blocking`):

1. `pick_slot`: of the model's idle contexts, take the one whose current KV
   shares the longest token prefix with the prompt (llama-server's slot prompt
   similarity), swapping it with the slot the scheduler handed out.
2. `PromptCache.restore_best`: if a kept state shares a longer prefix than
   that context holds, load it into the context.
3. `Llama.generate` finds the common prefix in the context and evaluates only
   the rest of the prompt (at least one token, for fresh logits).
4. `PromptCache.keep`: once the answer is out, a copy of the context's state
   (prompt and answer) is kept, unless a kept state already covers it; it
   replaces the kept states it mostly repeats (at least half of their tokens
   are its prefix), so each prefix is held once, in its latest form.

A kept state belongs to one model instance (one `_Loaded`: one set of weights
and one context size) and is dropped with it (`drop`): a state is only ever
loaded into a context of the instance that saved it. Each keeps the rendered
prompt text it came from (cut to `PROMPT_TEXT_MAX` characters) so the node can
advertise what it holds warm (`prompts`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

logger = logging.getLogger(__name__)

# Prompt text kept beside each state for adverts: a router keys on the text's
# start, and 16 Ki characters (about 4k tokens of English) tell prompts apart
# while a whole advert stays small.
PROMPT_TEXT_MAX = 16384
# A context holding fewer tokens than this is not worth a copy: evaluating 32
# tokens again takes about a tenth of a second on a CPU, a restore takes
# milliseconds but the copy takes memory from longer prefixes.
MIN_KEEP_TOKENS = 32
# llama.cpp's KV cache sequence every context of this engine uses.
SEQ = 0


def common_prefix(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def held(llama: Any) -> np.ndarray[Any, Any]:
    """The token ids whose KV `llama`'s context holds now."""
    return np.asarray(llama.input_ids[: llama.n_tokens])


def supported(llama: Any) -> bool:
    """Recurrent and hybrid models cannot cut a state back to a prefix."""
    return not (getattr(llama, "_is_recurrent", False) or getattr(llama, "_is_hybrid", False))


def pick_slot(slots: dict[int, Any], idle: set[int], own: int, tokens: np.ndarray[Any, Any]) -> int:
    """The slot (`own` or an idle one) whose context shares the longest prefix
    with `tokens`; `own` on a tie, so a slot keeps its own conversation."""
    best, best_n = own, common_prefix(held(slots[own]), tokens)
    for slot in idle:
        if slot != own and slot in slots:
            n = common_prefix(held(slots[slot]), tokens)
            if n > best_n:
                best, best_n = slot, n
    return best


def save(llama: Any) -> Any:
    """A copy of `llama`'s KV state and the token ids it holds, as a `LlamaState`.

    Only the sequence's KV is copied (`llama_state_seq_get_data`, as
    llama-server saves a slot): `Llama.save_state` would also copy its whole
    logits buffer (n_batch x n_vocab floats, 100 MB for a 49k vocabulary),
    which a restore never needs because `generate` evaluates at least one
    token after it."""
    import llama_cpp
    from llama_cpp.llama import LlamaState

    ctx = llama._ctx.ctx
    size = int(llama_cpp.llama_state_seq_get_size(ctx, SEQ))
    data = bytearray(size)
    view = (ctypes.c_uint8 * size).from_buffer(data)
    n = int(llama_cpp.llama_state_seq_get_data(ctx, view, size, SEQ))
    del view
    if n <= 0 or n > size:
        raise RuntimeError(f"llama_state_seq_get_data copied {n} of {size} bytes")
    if n < size:
        data = data[:n]
    # a bytearray where LlamaState says bytes: no second copy, and `restore`
    # hands it to llama.cpp through ctypes' from_buffer, which needs it writable
    return LlamaState(input_ids=held(llama).copy(), scores=np.empty((0, 0), dtype=np.single),
                      n_tokens=int(llama.n_tokens), llama_state=cast(bytes, data), llama_state_size=n,
                      seed=llama._seed)


def restore(llama: Any, state: Any) -> None:
    """Load a state `save` made (from a context of the same model instance) into `llama`."""
    import llama_cpp

    llama.reset()
    llama._ctx.kv_cache_clear()
    size = int(state.llama_state_size)
    view = (ctypes.c_uint8 * size).from_buffer(state.llama_state)
    try:
        if int(llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, view, size, SEQ)) != size:
            raise RuntimeError("llama_state_seq_set_data refused a kept state")
    finally:
        del view
    llama.input_ids[: state.n_tokens] = state.input_ids
    llama.n_tokens = state.n_tokens
    # the logits are not the state's: generate must evaluate before sampling
    llama._requires_eval = True


@dataclass
class Kept:
    owner: object  # the model instance (`_Loaded`) whose context saved it
    model: str
    tokens: np.ndarray[Any, Any]
    state: Any  # llama_cpp.llama.LlamaState
    text: str

    @property
    def size(self) -> int:
        return int(self.state.llama_state_size) + int(self.tokens.nbytes) + len(self.text)


class PromptCache:
    """Kept KV states of every loaded model, within one byte budget, LRU.

    Called from the engine's worker threads (several slots at once) and from
    the event loop (`drop`, `prompts`); one lock guards the index, and the
    copies themselves are made outside it."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, budget_bytes)
        self._kept: OrderedDict[int, Kept] = OrderedDict()  # id -> entry, least recently used first
        self._next = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def restore_best(self, owner: object, llama: Any, tokens: np.ndarray[Any, Any]) -> int:
        """Load into `llama` the kept state sharing the longest prefix with
        `tokens`, when it shares more than the context holds already. Returns
        the prefix length the context now has in common with `tokens`."""
        have = common_prefix(held(llama), tokens)
        if not self.enabled or not supported(llama):
            return have
        with self._lock:
            best: tuple[int, Kept] | None = None
            for key, kept in self._kept.items():
                if kept.owner is owner:
                    n = common_prefix(kept.tokens, tokens)
                    if n > have and (best is None or n > common_prefix(best[1].tokens, tokens)):
                        best = (key, kept)
            if best is None:
                return have
            self._kept.move_to_end(best[0])
            key, kept = best
        try:
            restore(llama, kept.state)
        except RuntimeError:
            with self._lock:  # llama.cpp refused it: never offer it again (the caller sets the context aside)
                if key in self._kept:
                    self._remove(key)
            raise
        return common_prefix(kept.tokens, tokens)

    def keep(self, owner: object, model: str, llama: Any, text: str) -> bool:
        """Keep a copy of `llama`'s state (unless a kept one covers it already).
        Returns True when a copy was made."""
        n = int(llama.n_tokens)
        if not self.enabled or n < MIN_KEEP_TOKENS or not supported(llama):
            return False
        tokens = held(llama)
        import llama_cpp

        if int(llama_cpp.llama_state_seq_get_size(llama._ctx.ctx, SEQ)) > self.budget:
            return False  # larger than the whole budget: it would evict everything and still not fit
        text = text[:PROMPT_TEXT_MAX]
        with self._lock:
            for key, kept in self._kept.items():
                if kept.owner is owner and len(kept.tokens) >= n and common_prefix(kept.tokens, tokens) == n:
                    self._kept.move_to_end(key)  # covered: a prefix of a kept state
                    if text and len(text) > len(kept.text):
                        kept.text = text
                    return False
        t0 = time.perf_counter()
        state = save(llama)
        took = time.perf_counter() - t0
        entry = Kept(owner=owner, model=model, tokens=state.input_ids, state=state, text=text)
        with self._lock:
            for key, kept in list(self._kept.items()):
                # Kept states this one mostly repeats: a tenant's system prompt
                # asked another question. It serves every prompt they would up
                # to where they part, and keeping both would hold that shared
                # prefix twice, pushing other tenants' prefixes out.
                if kept.owner is owner and common_prefix(kept.tokens, tokens) * 2 >= len(kept.tokens):
                    if not entry.text:
                        entry.text = kept.text
                    self._remove(key)
            self._kept[self._next] = entry
            self._next += 1
            self._bytes += entry.size
            while self._bytes > self.budget and self._kept:
                key = next(iter(self._kept))
                logger.debug("prompt cache full: dropping a kept state of %s (%d tokens)",
                             self._kept[key].model, len(self._kept[key].tokens))
                self._remove(key)
                self.evictions += 1
            logger.debug("kept a prompt state of %s: %d tokens, %.1f MiB in %.0f ms; %d kept, %.0f of %.0f MiB",
                         model, n, entry.size / 2**20, took * 1e3, len(self._kept), self._bytes / 2**20,
                         self.budget / 2**20)
        return True

    def _remove(self, key: int) -> None:
        kept = self._kept.pop(key)
        self._bytes -= kept.size

    def drop(self, owner: object) -> int:
        """Forget every state `owner` saved (its contexts are being closed)."""
        with self._lock:
            keys = [key for key, kept in self._kept.items() if kept.owner is owner]
            for key in keys:
                self._remove(key)
        return len(keys)

    def prompts(self, owners: Mapping[str, object]) -> dict[str, list[str]]:
        """Model name -> the prompt texts of the states kept for its instance
        in `owners`, most recently used first."""
        out: dict[str, list[str]] = {}
        with self._lock:
            for kept in reversed(self._kept.values()):
                if kept.text and owners.get(kept.model) is kept.owner:
                    out.setdefault(kept.model, []).append(kept.text)
        return out


def prefix_ids(tokens: list[int]) -> np.ndarray[Any, Any]:
    """Token ids as the array `common_prefix` compares (llama-cpp-python's own dtype)."""
    return np.asarray(tokens, dtype=np.intc)


def count_evals(llama: Any) -> list[int]:
    """Count the tokens `llama` evaluates from now on, in a one-item list the
    caller reads: the truth for `prompt_eval_count`, however much of the prompt
    `Llama.generate` found in the context. Undone by deleting the instance's
    `eval` attribute."""
    count = [0]
    run = type(llama).eval

    def counted(batch: Any) -> None:
        count[0] += len(batch)
        run(llama, batch)

    llama.eval = counted
    return count
