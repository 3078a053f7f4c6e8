"""Warm prefixes on the real llama.cpp engine (engines/prefixcache.py) with the
bundled SmolLM2: a prompt whose prefix a kept KV state holds evaluates only
its suffix (`prompt_eval_count` drops, the counters move) and answers exactly
as a cold evaluation does; strict prefixes, prompts that part in the middle,
two tenants alternating within the budget, eviction past it; and the life
cycle: an unload while a state is being saved, a num_ctx reload, the slot whose
context shares the longest prefix."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from ollama_distributed.config import EngineSection
from ollama_distributed.engines.base import CancelToken, InferenceRequest
from ollama_distributed.engines.llamacpp import LlamaCppEngine
from ollama_distributed.models import catalog
from ollama_distributed.models.store import ModelRecord, Store
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import MODEL, NodeProc, start_node

# One thread: two cores are shared with the rest of the suite. Each prefix below
# is ~300 tokens, whose KV state is ~7 MB: 16 MiB keeps two of them, not three.
CACHE_MIB = 16
GREEDY = {"temperature": 0, "num_predict": 12}


def prefix(name: str) -> str:
    """A tenant's system text: ~300 tokens that no other tenant's shares a word of at its start."""
    return f"{name} handbook.\n" + " ".join(f"Rule {i} of {name}: answer briefly and kindly." for i in range(25)) + "\n"


A, B, C = prefix("Alpha"), prefix("Bravo"), prefix("Charlie")
Q = ["Question: what is rule 3?\nAnswer:", "Question: who wrote this?\nAnswer:",
     "Question: is rule 7 kind?\nAnswer:", "Question: name a colour.\nAnswer:"]


def generate(n: NodeProc, prompt: str, **options: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "raw": True, "stream": False, "options": {**GREEDY, **options}}
    req = urllib.request.Request(n.url + "/api/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def cold(n: NodeProc, prompt: str) -> dict[str, Any]:
    """The same prompt evaluated whole: a seeded request resets the context and
    keeps no prefix (greedy, so the seed does not change the answer)."""
    return generate(n, prompt, seed=1)


def counters(n: NodeProc) -> tuple[float, float]:
    with urllib.request.urlopen(n.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    got = {"cached": 0.0, "evaluated": 0.0}
    for fam in text_string_to_metric_families(text):
        for kind in got:
            if fam.name == f"ollama_distributed_prompt_tokens_{kind}":
                got[kind] = sum(s.value for s in fam.samples
                                if s.name.endswith("_total") and s.labels.get("model") == MODEL)
    return got["cached"], got["evaluated"]


@pytest.fixture(scope="module")
def warm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = start_node(tmp_path_factory.mktemp("warm"), env={
        "OLLAMA_DISTRIBUTED_ENGINE_PROMPT_CACHE_MIB": str(CACHE_MIB),
        "OLLAMA_DISTRIBUTED_ENGINE_THREADS": "1"})
    yield n
    n.stop()


def test_a_kept_prefix_evaluates_only_the_suffix_and_answers_the_same(warm_node: NodeProc) -> None:
    n = warm_node
    cached0, evaluated0 = counters(n)
    print("=== tenant A, then tenant B: both cold")
    a1 = generate(n, A + Q[0])
    b1 = generate(n, B + Q[0])
    assert a1["prompt_eval_count"] > 250 and b1["prompt_eval_count"] > 250
    print("=== A again, another question: A's kept state is restored over B's context")
    warm = generate(n, A + Q[1])
    whole = cold(n, A + Q[1])
    assert whole["prompt_eval_count"] > 250
    assert warm["prompt_eval_count"] < 20, warm  # only the question
    assert warm["response"] == whole["response"] and warm["eval_count"] == whole["eval_count"]
    print("=== the counters: every evaluated token counted once; the restored prefix as cached")
    cached, evaluated = counters(n)
    sent = [a1, b1, warm, whole]
    assert evaluated - evaluated0 == sum(r["prompt_eval_count"] for r in sent)
    assert cached - cached0 >= whole["prompt_eval_count"] - warm["prompt_eval_count"]


def test_two_tenants_alternating_stay_warm_within_the_budget(warm_node: NodeProc) -> None:
    n = warm_node
    generate(n, A + Q[0])
    generate(n, B + Q[0])
    for q in Q[1:]:
        for tenant in (A, B):
            out = generate(n, tenant + q)
            assert out["prompt_eval_count"] < 20, (tenant[:5], q, out["prompt_eval_count"])


def test_a_strict_prefix_of_a_kept_prompt(warm_node: NodeProc) -> None:
    n = warm_node
    generate(n, A + Q[2])
    generate(n, B + Q[2])  # the slot's context now holds B: A comes from the kept state
    warm = generate(n, A)
    assert warm["prompt_eval_count"] <= 2  # the last token again, for fresh logits
    assert warm["response"] == cold(n, A)["response"]


def test_a_prompt_that_parts_in_the_middle(warm_node: NodeProc) -> None:
    n = warm_node
    generate(n, A + Q[3])
    generate(n, B + Q[3])
    tail = " Then the rules change: every answer is a single word.\n" + Q[0]
    parted = A[: A.index(" Rule 12 ")] + tail  # A's first half, then its own way
    warm = generate(n, parted)
    whole = cold(n, parted)
    assert warm["response"] == whole["response"]
    # A's first half came from its kept state; what follows was evaluated
    assert abs(warm["prompt_eval_count"] - cold(n, tail)["prompt_eval_count"]) <= 3, warm
    assert warm["prompt_eval_count"] < whole["prompt_eval_count"] // 2


def test_past_the_budget_the_least_recently_used_prefix_goes(warm_node: NodeProc) -> None:
    n = warm_node
    generate(n, B + Q[1])
    generate(n, A + Q[1])  # A is the most recently used, B next
    print("=== a third tenant: two states fit the budget, so B's goes")
    c1 = generate(n, C + Q[1])
    assert c1["prompt_eval_count"] > 250
    again = generate(n, B + Q[2])
    assert again["prompt_eval_count"] > 250, again  # evicted: evaluated whole
    print("=== B's new state pushed out A's; C is still warm")
    assert generate(n, C + Q[2])["prompt_eval_count"] < 20


def test_openai_usage_counts_the_whole_prompt_and_the_cached_part(warm_node: NodeProc) -> None:
    import openai

    c = openai.OpenAI(base_url=warm_node.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def chat(question: str) -> Any:
        return c.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": C}, {"role": "user", "content": question}]).usage

    first, second = chat("What is rule 3?"), chat("What is rule 4?")
    assert first is not None and second is not None and second.prompt_tokens_details is not None
    assert second.prompt_tokens == first.prompt_tokens  # the whole prompt, as OpenAI counts it
    assert second.prompt_tokens_details.cached_tokens > 250  # C's rules were warm
    assert second.total_tokens == second.prompt_tokens + second.completion_tokens


# ---- the engine in-process: its life cycle ----------------------------------


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> ModelRecord:
    store = Store(tmp_path_factory.mktemp("store") / "models")
    store.ensure()
    catalog.register_default(store, MODEL)
    return store.get(MODEL)


def engine(num_parallel: int = 1) -> LlamaCppEngine:
    cfg = EngineSection(prompt_cache_mib=CACHE_MIB, threads=1, num_parallel=num_parallel)
    return LlamaCppEngine(cfg, lambda names, limit: None, lambda model: True)


async def run(eng: LlamaCppEngine, record: ModelRecord, prompt: str, slot: int = 0,
              **options: Any) -> tuple[str, dict[str, Any]]:
    req = InferenceRequest(kind="generate", model=MODEL, prompt=prompt, raw=True,
                           options={**GREEDY, **options})
    text, final = "", {}
    async for chunk in eng.generate(req, record, slot, CancelToken()):
        text += chunk.get("text", "")
        final = chunk if chunk.get("done") else final
    return text, final


async def test_warm_prompts_name_what_is_kept(record: ModelRecord) -> None:
    eng = engine()
    await eng.start()
    try:
        assert eng.warm_prompts() == {}
        await run(eng, record, A + Q[0])
        await run(eng, record, B + Q[0])
        warm = eng.warm_prompts()
        assert list(warm) == [MODEL] and warm[MODEL][:2] == [B + Q[0], A + Q[0]]  # most recent first
        await run(eng, record, C + Q[0])  # past the budget: A's state goes
        kept = eng.warm_prompts()[MODEL]
        assert A + Q[0] not in kept and kept[:2] == [C + Q[0], B + Q[0]]
        assert eng.cache.bytes <= CACHE_MIB << 20 and len(eng.cache) == 2 and eng.cache.evictions >= 1
        print("=== another num_ctx: a fresh instance, the old one's states dropped with it")
        _, final = await run(eng, record, B + Q[1], num_ctx=1024)
        assert final["prompt_eval_count"] > 250  # B's state belonged to the 2048-token instance
        assert len(eng.cache) == 1 and eng.warm_prompts()[MODEL] == [B + Q[1]]
    finally:
        await eng.stop()


async def test_an_unload_while_a_state_is_being_saved(record: ModelRecord) -> None:
    eng = engine()
    await eng.start()
    saving, go_on = threading.Event(), threading.Event()
    keep = eng.cache.keep

    def slow_keep(*args: Any) -> bool:
        saving.set()
        assert go_on.wait(120)
        return keep(*args)

    eng.cache.keep = slow_keep  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(run(eng, record, A + Q[0]))
        assert await asyncio.to_thread(saving.wait, 300)  # the answer is out, the copy is starting
        lm = eng._models[MODEL]
        await eng.unload(MODEL)
        assert MODEL not in eng.warm_prompts() and lm.slots  # out of service, contexts still open
        go_on.set()
        text, final = await task
        assert final["done_reason"] in ("stop", "length") and text
        while lm.users:
            await asyncio.sleep(0.05)
        assert not lm.slots and len(eng.cache) == 0  # closed, and nothing kept for it
        eng.cache.keep = keep  # type: ignore[method-assign]
        _, again = await run(eng, record, A + Q[0])
        assert again["prompt_eval_count"] > 250  # a fresh instance starts cold
        assert len(eng.cache) == 1
    finally:
        go_on.set()
        await eng.stop()


async def test_the_slot_whose_context_shares_the_longest_prefix(record: ModelRecord) -> None:
    eng = engine(num_parallel=2)
    eng.cache.budget = 0  # slots' own contexts only: which one is picked is what matters here
    await eng.start()
    try:
        await asyncio.gather(run(eng, record, A + Q[0], slot=0), run(eng, record, B + Q[0], slot=1))
        lm = eng._models[MODEL]
        holds_b = lm.slots[1]
        _, final = await run(eng, record, B + Q[1], slot=0)  # slot 0 held A; slot 1, idle, holds B
        assert final["prompt_eval_count"] < 20
        assert lm.slots[0] is holds_b  # B's context moved to the slot the request was given
        assert len(eng.cache) == 0
    finally:
        await eng.stop()
