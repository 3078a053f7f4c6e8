"""The official `openai` client against a real node and the real engine."""

from __future__ import annotations

import openai
import pytest

from ..conftest import MODEL, NodeProc


@pytest.fixture(scope="module")
def client(node: NodeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def test_chat_non_streaming_with_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=8, temperature=0, seed=7)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=10,
                  temperature=0, seed=7)
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 **kwargs))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                  temperature=0, seed=1)
    assert r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, seed=1, stream=True)
        if c.choices)
    assert streamed == r.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=MODEL, input=["a", "b c"])
    assert [d.index for d in r.data] == [0, 1]
    assert len(r.data[0].embedding) == 576


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope:latest")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
