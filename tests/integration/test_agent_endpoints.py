"""Anthropic's /v1/messages and OpenAI's /v1/responses with their official
clients, logprobs on every path, images, dimensions and bad input, against a
node on the mock engine (it answers `think` with thinking, `tools` with a call
of the first tool, and `logprobs` with a valid distribution: engines/mock.py),
so what is checked is the translation, chunk by chunk."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from ..conftest import MODEL, NodeProc, start_node

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FN_WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
              "parameters": WEATHER["input_schema"]}


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = start_node(tmp_path_factory.mktemp("mock"), "--engine", "mock",
                   env={"OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS": "6"})
    yield n
    n.stop()


def post(n: NodeProc, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(n.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            try:
                return int(r.status), json.loads(raw)
            except ValueError:  # NDJSON or SSE: the caller splits it
                return int(r.status), raw
    except urllib.error.HTTPError as e:
        return int(e.code), json.loads(e.read())


def claude(n: NodeProc, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=n.url, api_key=key, max_retries=0)


def oai(n: NodeProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=n.url + "/v1", api_key="unused", max_retries=0)


# ---- Anthropic Messages ---------------------------------------------------------------


def test_messages_text_with_the_anthropic_client(mock: NodeProc) -> None:
    msg = claude(mock).messages.create(model=MODEL, max_tokens=4, system="Be brief.",
                                       messages=[{"role": "user", "content": "Hello"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert len(msg.content[0].text.split()) == 4  # type: ignore[union-attr]
    assert msg.stop_reason == "max_tokens"  # max_tokens is num_predict: the mock stopped at it
    assert msg.usage.output_tokens == 4 and msg.usage.input_tokens > 0


def test_messages_stream_events_in_order(mock: NodeProc) -> None:
    events = list(claude(mock).messages.create(model=MODEL, max_tokens=3, stream=True,
                                               messages=[{"role": "user", "content": "Hello"}]))
    kinds = [e.type for e in events]
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"], kinds
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")  # type: ignore[union-attr]
    assert len(text.split()) == 3
    delta = events[-2]
    assert delta.delta.stop_reason == "max_tokens" and delta.usage.output_tokens == 3  # type: ignore[union-attr]
    assert events[0].message.usage.input_tokens >= 1  # type: ignore[union-attr]  # estimated until counted

    with claude(mock).messages.stream(model=MODEL, max_tokens=3,
                                      messages=[{"role": "user", "content": "Hello"}]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert final.content[0].text == streamed and streamed  # type: ignore[union-attr]


def test_messages_tool_use_round_trip(mock: NodeProc) -> None:
    c = claude(mock)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = c.messages.create(model=MODEL, max_tokens=16, tools=[WEATHER], messages=ask)  # type: ignore[list-item]
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "mock"}
    assert use.id
    answer = c.messages.create(model=MODEL, max_tokens=4, tools=[WEATHER], messages=[  # type: ignore[list-item]
        *ask, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]},
    ])
    assert answer.stop_reason == "max_tokens" and answer.content[0].type == "text"

    with c.messages.stream(model=MODEL, max_tokens=16, tools=[WEATHER], messages=ask) as s:  # type: ignore[list-item]
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    block = final.content[-1]
    assert block.type == "tool_use" and block.input == {"city": "mock"}  # rebuilt from input_json_delta


def test_messages_tool_choice_and_thinking(mock: NodeProc) -> None:
    other = {**WEATHER, "name": "get_time"}
    msg = claude(mock).messages.create(model=MODEL, max_tokens=16, tools=[WEATHER, other],  # type: ignore[list-item]
                                       tool_choice={"type": "tool", "name": "get_time"},
                                       thinking={"type": "enabled", "budget_tokens": 1024},
                                       messages=[{"role": "user", "content": "Time?"}])
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == "mock thinking. "  # type: ignore[union-attr]
    assert msg.content[1].name == "get_time"  # type: ignore[union-attr]
    none = claude(mock).messages.create(model=MODEL, max_tokens=2, tools=[WEATHER],  # type: ignore[list-item]
                                        tool_choice={"type": "none"},
                                        messages=[{"role": "user", "content": "Hi"}])
    assert [b.type for b in none.content] == ["text"]


@pytest.mark.parametrize("messages,needle", [
    ([{"role": "user", "content": [{"type": "video", "url": "x"}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text is required"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}],
     "matches no earlier tool_use"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                "data": "aGVsbG8="}}]}],
     "does not support vision"),
    ([{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "%%%"}}]}],
     "is not valid base64"),
])
def test_messages_bad_input_is_a_clear_400(mock: NodeProc, messages: list[Any], needle: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        claude(mock).messages.create(model=MODEL, max_tokens=4, messages=messages)
    assert needle in str(e.value), str(e.value)
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"


def test_messages_missing_fields_name_them(mock: NodeProc) -> None:
    status, body = post(mock, "/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["message"] == "max_tokens is required"
    status, body = post(mock, "/v1/messages", {"model": MODEL, "max_tokens": 4})
    assert status == 400 and body["error"]["message"] == "messages is required"
    status, body = post(mock, "/v1/messages", {"model": MODEL, "max_tokens": 4, "tools": [{"name": "f"}],
                                               "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "tools[0].input_schema" in body["error"]["message"]
    bad_schema = {"type": "object", "properties": {"x": {"type": "nosuch"}}}  # not JSON Schema
    status, body = post(mock, "/v1/messages", {"model": MODEL, "max_tokens": 4,
                                               "tools": [{"name": "f", "input_schema": bad_schema}],
                                               "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "is not a JSON Schema type" in body["error"]["message"], body
    status, body = post(mock, "/v1/responses", {"model": MODEL, "input": "x", "tools": [
        {"type": "function", "name": "f", "parameters": bad_schema}]})
    assert status == 400 and "is not a JSON Schema type" in body["error"]["message"], body
    status, body = post(mock, "/v1/messages", {"model": "nope", "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    # a stream refused before its first event keeps its status, in Anthropic's shape
    status, body = post(mock, "/v1/messages", {"model": "nope", "max_tokens": 4, "stream": True,
                                               "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and body["type"] == "error" and "nope" in body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        list(claude(mock).messages.create(model="nope", max_tokens=4, stream=True,
                                          messages=[{"role": "user", "content": "x"}]))
    # and nothing changed: the node serves the next request, nothing left in flight
    assert claude(mock).messages.create(model=MODEL, max_tokens=1,
                                        messages=[{"role": "user", "content": "x"}]).content
    status_now: dict[str, Any] = mock.get("/api/distributed/status")  # type: ignore[assignment]
    assert status_now["scheduler_stats"]["in_flight"] == 0


def test_x_api_key_is_accepted_when_keys_are_in_force(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", env={"OLLAMA_DISTRIBUTED_API_AUTH_TOKENS": "s3cret"})
    try:
        ok = claude(n, "s3cret").messages.create(model=MODEL, max_tokens=1,
                                                 messages=[{"role": "user", "content": "x"}])
        assert ok.content
        with pytest.raises(anthropic.AuthenticationError) as e:
            claude(n, "wrong").messages.create(model=MODEL, max_tokens=1,
                                               messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 401
    finally:
        n.stop()


# ---- OpenAI Responses -------------------------------------------------------------------


def test_responses_text_with_the_openai_client(mock: NodeProc) -> None:
    r = oai(mock).responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=4)
    assert r.object == "response" and r.id.startswith("resp_")
    assert len(r.output_text.split()) == 4
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    assert r.usage is not None and r.usage.output_tokens == 4 and r.usage.input_tokens > 0
    full = oai(mock).responses.create(model=MODEL, input=[{"role": "user", "content": "Hi"}])
    assert full.status == "completed" and full.output_text


def test_responses_stream_events_as_openai_names_them(mock: NodeProc) -> None:
    events = list(oai(mock).responses.create(model=MODEL, input="Hello", max_output_tokens=2, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    assert events[6].text == deltas  # type: ignore[union-attr]
    assert events[-1].response.output_text == deltas  # type: ignore[union-attr]


def test_responses_function_call_round_trip(mock: NodeProc) -> None:
    c = oai(mock)
    first = c.responses.create(model=MODEL, input="Weather in Paris?", tools=[FN_WEATHER])  # type: ignore[list-item]
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "mock"}
    second = c.responses.create(model=MODEL, tools=[FN_WEATHER], max_output_tokens=3, input=[  # type: ignore[list-item]
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
    ])
    assert second.output_text and second.output[-1].type == "message"
    events = list(c.responses.create(model=MODEL, input="Weather?", tools=[FN_WEATHER], stream=True))  # type: ignore[list-item]
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds


@pytest.mark.parametrize("body,needle", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id is not supported"),
    ({"input": [{"type": "computer_call"}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "1"}]}, "matches no earlier"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({}, "input is required"),
])
def test_responses_bad_input_is_a_clear_400(mock: NodeProc, body: dict[str, Any], needle: str) -> None:
    status, out = post(mock, "/v1/responses", {"model": MODEL, **body})
    assert status == 400 and needle in out["error"]["message"], out


def test_responses_unknown_model_is_404_streamed_or_not(mock: NodeProc) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError):
            r = oai(mock).responses.create(model="nope", input="x", stream=stream)
            list(r) if stream else None  # type: ignore[call-overload]


# ---- logprobs, images, dimensions -----------------------------------------------------------


def test_openai_chat_logprobs_with_the_client(mock: NodeProc) -> None:
    c = oai(mock)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                  top_logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 6
    assert "".join(t.token for t in lp.content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.logprob == pytest.approx(math.log(0.5)) for t in lp.content)
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            logprobs=True, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content or []]
    assert len(streamed) == 6 and all(t.top_logprobs == [] for t in streamed)
    plain = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert plain.choices[0].logprobs is None


def test_openai_completions_logprobs_shape(mock: NodeProc) -> None:
    r = oai(mock).completions.create(model=MODEL, prompt="Once", logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(alts) == 2 for alts in lp.top_logprobs or [])


def test_ollama_logprobs_on_generate_and_chat(mock: NodeProc) -> None:
    status, out = post(mock, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False, "logprobs": True,
                                               "top_logprobs": 2})
    assert status == 200 and len(out["logprobs"]) == 6
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} and len(e["top_logprobs"]) == 2
               for e in out["logprobs"])
    status, raw = post(mock, "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                           "logprobs": True})
    lines = [json.loads(x) for x in raw.splitlines()]
    assert sum(len(x.get("logprobs", [])) for x in lines) == 6


@pytest.mark.parametrize("path,body", [
    ("/api/generate", {"prompt": "x", "logprobs": True, "top_logprobs": 21}),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}),
    ("/v1/responses", {"input": "x", "top_logprobs": 21}),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}),
    ("/api/generate", {"prompt": "x", "top_logprobs": -1}),
])
def test_top_logprobs_above_20_is_400(mock: NodeProc, path: str, body: dict[str, Any]) -> None:
    status, out = post(mock, path, {"model": MODEL, **body})
    err = out["error"] if isinstance(out["error"], str) else out["error"]["message"]
    assert status == 400 and "between 0 and 20" in err, out


@pytest.mark.parametrize("path,body,needle", [
    ("/api/generate", {"prompt": "x", "images": ["aGVsbG8="]}, f"{MODEL} does not support vision"),
    ("/api/generate", {"prompt": "x", "images": ["not base64!"]}, "images[0] is not valid base64"),
    ("/api/generate", {"prompt": "x", "images": "aGVsbG8="}, "images must be a list"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGVsbG8="]}]}, "does not support vision"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": [1]}]}, "messages[0].images must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}, "does not support vision"),
])
def test_images_are_parsed_then_refused(mock: NodeProc, path: str, body: dict[str, Any], needle: str) -> None:
    status, out = post(mock, path, {"model": MODEL, **body})
    err = out["error"] if isinstance(out["error"], str) else out["error"]["message"]
    assert status == 400 and needle in err, out


def test_raw_refuses_template_system_and_context(mock: NodeProc) -> None:
    status, out = post(mock, "/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "system": "s"})
    assert status == 400 and out["error"] == "raw mode does not support template, system, or context"
    status, out = post(mock, "/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "stream": False})
    assert status == 200 and out["done"]


def test_embed_dimensions_are_cut_and_normalised(mock: NodeProc) -> None:
    status, out = post(mock, "/api/embed", {"model": MODEL, "input": ["a", "b"], "dimensions": 4})
    assert status == 200 and [len(v) for v in out["embeddings"]] == [4, 4]
    assert all(sum(x * x for x in v) == pytest.approx(1.0) for v in out["embeddings"])
    status, full = post(mock, "/api/embed", {"model": MODEL, "input": "a"})
    head = full["embeddings"][0][:4]
    norm = math.sqrt(sum(x * x for x in head))
    assert out["embeddings"][0] == pytest.approx([x / norm for x in head])
    status, out = post(mock, "/api/embed", {"model": MODEL, "input": "a", "dimensions": -1})
    assert status == 400 and "dimensions" in out["error"]
    r = oai(mock).embeddings.create(model=MODEL, input="a", dimensions=4)
    assert len(r.data[0].embedding) == 4


def test_ps_context_length_and_head_version(mock: NodeProc) -> None:
    post(mock, "/api/generate", {"model": MODEL, "prompt": "x", "stream": False})
    ps: dict[str, Any] = mock.get("/api/ps")  # type: ignore[assignment]
    assert ps["models"] and ps["models"][0]["context_length"] == 2048
    with urllib.request.urlopen(urllib.request.Request(mock.url + "/api/version", method="HEAD")) as r:
        assert r.status == 200 and r.read() == b""


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_logprobs_through_an_upstream_engine(mock: NodeProc, tmp_path: Path, kind: str) -> None:
    """A node whose engine is another node (Ollama's or OpenAI's API) passes
    logprobs through and brings them back."""
    n = start_node(tmp_path, "--engine", kind, "--upstream", mock.url)
    try:
        status, out = post(n, "/api/chat", {"model": MODEL, "stream": False, "logprobs": True, "top_logprobs": 2,
                                            "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200, out
        assert len(out["logprobs"]) == 6 and all(len(e["top_logprobs"]) == 2 for e in out["logprobs"])
        assert "".join(e["token"] for e in out["logprobs"]) == out["message"]["content"]
    finally:
        n.stop()
