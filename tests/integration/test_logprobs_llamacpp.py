"""logprobs from the llama.cpp engine's real logits, on Ollama's and OpenAI's
paths; suffix, shift and dimensions with the bundled SmolLM2."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from ..conftest import MODEL, NodeProc, start_node

# Greedy on the raw logits (no repeat penalty), so the token taken is the likeliest one reported.
GREEDY = {"temperature": 0, "seed": 7, "num_predict": 8, "repeat_penalty": 1.0}


def post(n: NodeProc, path: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(n.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read())


def test_generate_logprobs_come_from_the_logits(node: NodeProc) -> None:
    status, out = post(node, "/api/generate", {"model": MODEL, "prompt": "Name three colours.", "stream": False,
                                               "logprobs": True, "top_logprobs": 3, "options": GREEDY})
    assert status == 200, out
    lps = out["logprobs"]
    assert len(lps) == out["eval_count"] == 8
    assert "".join(e["token"] for e in lps) == out["response"]
    for e in lps:
        assert e["logprob"] <= 0 and bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        top = e["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # greedy: the token taken is the likeliest one, with the same log probability
        assert top[0]["token"] == e["token"] and top[0]["logprob"] == pytest.approx(e["logprob"])
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-6
    # the same request without logprobs: the same text, and no logprobs field
    status, plain = post(node, "/api/generate", {"model": MODEL, "prompt": "Name three colours.", "stream": False,
                                                 "options": GREEDY})
    assert plain["response"] == out["response"] and "logprobs" not in plain


def test_streamed_chat_logprobs_cover_every_token(node: NodeProc) -> None:
    req = urllib.request.Request(node.url + "/api/chat", data=json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "logprobs": True,
        "options": GREEDY}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        lines = [json.loads(x) for x in r.read().splitlines()]
    text = "".join(x["message"]["content"] for x in lines)
    lps = [e for x in lines for e in x.get("logprobs", [])]
    assert "".join(e["token"] for e in lps) == text and lps
    assert all("top_logprobs" not in e for e in lps)  # none asked for
    assert lines[-1]["eval_count"] == len(lps)


def test_openai_logprobs_from_the_engine(node: NodeProc) -> None:
    c = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                  logprobs=True, top_logprobs=2, temperature=0, seed=7, max_tokens=6)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and "".join(t.token for t in content) == r.choices[0].message.content
    # logprobs are the model's, before the repeat penalty the sampler applies: the
    # token taken is at most as likely as the likeliest
    assert all(len(t.top_logprobs) == 2 and t.logprob <= t.top_logprobs[0].logprob + 1e-6 for t in content)
    comp = c.completions.create(model=MODEL, prompt="The capital of France is", logprobs=1, temperature=0,
                                seed=7, max_tokens=4)
    lp = comp.choices[0].logprobs
    assert lp is not None and "".join(lp.tokens or []) == comp.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs or [])
    assert len(lp.top_logprobs or []) == len(lp.tokens or []) == 4
    assert all(lp_ <= max(alts.values()) + 1e-6 for lp_, alts in
               zip(lp.token_logprobs or [], lp.top_logprobs or [], strict=True))


def test_suffix_on_a_model_without_fill_in_the_middle(node: NodeProc) -> None:
    # SmolLM2 has no FIM tokens and its template no .Suffix: Ollama's words
    status, out = post(node, "/api/generate", {"model": MODEL, "prompt": "def f(", "suffix": "    return x"})
    assert status == 400 and out["error"] == f"{MODEL} does not support insert"
    status, out = post(node, "/v1/completions", {"model": MODEL, "prompt": "def f(", "suffix": "return x"})
    assert status == 400 and "does not support insert" in out["error"]["message"]


def test_truncate_false_refuses_a_prompt_longer_than_the_context(node: NodeProc) -> None:
    long = "word " * 2100  # over the default num_ctx of 2048 tokens
    status, out = post(node, "/api/generate", {"model": MODEL, "prompt": long, "truncate": False})
    assert status == 400 and out["error"] == "the input length exceeds the context length"
    status, out = post(node, "/api/chat", {"model": MODEL, "truncate": False,
                                           "messages": [{"role": "user", "content": long}]})
    assert status == 400 and out["error"] == "the input length exceeds the context length"
    status, out = post(node, "/api/generate", {"model": MODEL, "prompt": "x", "truncate": "no"})
    assert status == 400 and "truncate" in out["error"]


def test_embed_dimensions_on_the_real_model(node: NodeProc) -> None:
    status, out = post(node, "/api/embed", {"model": MODEL, "input": "hello", "dimensions": 8})
    assert status == 200 and len(out["embeddings"][0]) == 8
    assert sum(x * x for x in out["embeddings"][0]) == pytest.approx(1.0)


def test_shift_goes_on_past_a_full_window(tmp_path: Path) -> None:
    """num_ctx 256 (llama.cpp's smallest: it pads to 256): without shift the
    window ends the answer at 'length'; with it the engine drops the older half
    and keeps generating."""
    n = start_node(tmp_path, "--engine", "llamacpp")
    try:
        base = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "raw": True, "stream": False,
                "options": {"num_ctx": 256, "num_predict": 320, "temperature": 0, "seed": 1}}
        status, stopped = post(n, "/api/generate", {**base, "shift": False})
        assert status == 200 and stopped["done_reason"] == "length"
        assert stopped["prompt_eval_count"] + stopped["eval_count"] == 256
        status, shifted = post(n, "/api/generate", base)
        assert status == 200, shifted
        assert shifted["eval_count"] > stopped["eval_count"]  # it went on past the window
        assert shifted["response"].startswith(stopped["response"])
    finally:
        n.stop()


def test_messages_and_responses_on_the_real_engine(node: NodeProc) -> None:
    import anthropic

    msg = anthropic.Anthropic(base_url=node.url, api_key="x", max_retries=0).messages.create(
        model=MODEL, max_tokens=6, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Say hello."}])
    assert msg.content[0].type == "text" and msg.content[0].text  # type: ignore[union-attr]
    assert msg.usage.output_tokens == 6 and msg.stop_reason == "max_tokens"
    # as Anthropic counts: a prefix the node held warm is read from cache, not input
    assert msg.usage.input_tokens >= 1 and msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 5
    c = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    events = list(c.responses.create(model=MODEL, input="Say hello.", max_output_tokens=6, temperature=0,
                                     stream=True, include=["message.output_text.logprobs"]))
    done = events[-1].response  # type: ignore[union-attr]
    assert done.usage is not None and done.usage.output_tokens == 6
    part = done.output[0].content[0]  # type: ignore[union-attr]
    assert part.text and "".join(t.token for t in part.logprobs or []) == part.text  # type: ignore[union-attr]


def test_logprobs_with_the_official_ollama_client(node: NodeProc) -> None:
    import ollama

    c = ollama.Client(host=node.url)
    r = c.generate(MODEL, "Name a fruit.", logprobs=True, top_logprobs=2, options=GREEDY)
    assert r.logprobs and len(r.logprobs) == r.eval_count
    assert "".join(lp.token for lp in r.logprobs) == r.response
    assert all(lp.top_logprobs and len(lp.top_logprobs) == 2 for lp in r.logprobs)
    parts = list(c.chat(MODEL, messages=[{"role": "user", "content": "Name a fruit."}], logprobs=True,
                        options=GREEDY, stream=True))
    tokens = [lp.token for p in parts for lp in (p.logprobs or [])]
    assert tokens and "".join(tokens) == "".join(p.message.content or "" for p in parts)
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(MODEL, "x", logprobs=True, top_logprobs=21)
    assert e.value.status_code == 400 and "top_logprobs must be between 0 and 20" in str(e.value)


def test_ps_shows_the_context_length_the_model_runs_with(node: NodeProc) -> None:
    post(node, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}})
    ps: dict[str, Any] = node.get("/api/ps")  # type: ignore[assignment]
    entry = next(m for m in ps["models"] if m["name"] == MODEL)
    assert entry["context_length"] == 2048  # engine.num_ctx's default
