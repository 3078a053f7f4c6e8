"""What agents send: tools, tool results, thinking, capabilities; against a
real node and the real engine, with the official `ollama` and `openai` clients.

SmolLM2 is too small to call tools on its own, so the call is forced with
`tool_choice` (a grammar built from the tool's schema); the rest (rendering
the tools, parsing the call, streaming it, feeding the result back) is what a
capable model goes through too."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from ..conftest import MODEL, NodeProc, start_node

TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]
OPTS = {"temperature": 0, "seed": 7, "num_predict": 40}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
RESULT = "18 degrees Celsius and sunny"


def post(node: NodeProc, path: str, obj: Any) -> tuple[int, Any]:
    req = urllib.request.Request(node.url + path, json.dumps(obj).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def test_show_reports_tools_for_the_default_model(node: NodeProc) -> None:
    status, shown = post(node, "/api/show", {"model": MODEL})
    assert status == 200
    assert shown["capabilities"] == ["completion", "embedding", "tools"]
    assert "{{ .Function }}" in shown["template"]  # the tools-capable Go template


def test_tool_round_trip_ollama_ndjson(node: NodeProc) -> None:
    client = ollama.Client(host=node.url, timeout=300)
    print("=== the model calls get_weather (streamed NDJSON)")
    # The client has no tool_choice parameter (neither has Ollama's API); its
    # request method carries our extension field and parses the stream.
    parts = list(client._request(ollama.ChatResponse, "POST", "/api/chat", stream=True, json={
        "model": MODEL, "messages": [QUESTION], "tools": TOOLS, "tool_choice": "required", "options": OPTS}))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1, parts
    call = calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments["city"], str) and call.function.arguments["city"]
    assert not "".join(p.message.content or "" for p in parts).strip()  # the call is not shown as text
    print("=== the tool answers as role tool; the model answers")
    msgs: list[Any] = [QUESTION, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                       {"role": "tool", "content": RESULT, "tool_name": "get_weather"}]
    answer = client.chat(MODEL, messages=msgs, tools=TOOLS, options=OPTS)
    assert answer.message.content.strip() or answer.message.tool_calls
    assert answer.prompt_eval_count > parts[-1].prompt_eval_count + 20  # the call and its result were in the prompt


def test_tool_round_trip_openai_sse(node: NodeProc) -> None:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=300)
    print("=== the model calls get_weather (streamed SSE deltas)")
    stream = client.chat.completions.create(
        model=MODEL, messages=[QUESTION], tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        stream=True, temperature=0, seed=7, max_tokens=40)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        for d in choice.delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += d.id or ""
            c["name"] += (d.function and d.function.name) or ""
            c["arguments"] += (d.function and d.function.arguments) or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    args = json.loads(calls[0]["arguments"])
    assert isinstance(args["city"], str)
    print("=== the result goes back by tool_call_id; the model answers in text")
    msgs: list[Any] = [QUESTION,
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": calls[0]["id"], "type": "function",
                            "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
                       {"role": "tool", "tool_call_id": calls[0]["id"], "content": RESULT}]
    text = ""
    finish = None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS,  # type: ignore[arg-type]
                                                tool_choice="none", stream=True, temperature=0, seed=7,
                                                max_tokens=24):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            assert not chunk.choices[0].delta.tool_calls
            finish = chunk.choices[0].finish_reason or finish
    assert text.strip() and finish in ("stop", "length")


def test_named_function_openai_not_streamed(node: NodeProc) -> None:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=300)
    done = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, seed=3,
        max_tokens=40)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"
    assert isinstance(json.loads(choice.message.tool_calls[0].function.arguments)["city"], str)


def test_thinking_split_from_content(node: NodeProc) -> None:
    """A model whose template has a thinking section: thinking in message.thinking, off with think false."""
    template = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if .Thinking }}<think>{{ .Thinking }}</think>"
                "{{ end }}{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ if .Think }}<think>\n{{ end }}")
    status, _ = post(node, "/api/create", {"model": "smol-think", "from": MODEL, "template": template,
                                          "stream": False})
    assert status == 200
    status, shown = post(node, "/api/show", {"model": "smol-think"})
    assert "thinking" in shown["capabilities"] and "tools" not in shown["capabilities"]
    client = ollama.Client(host=node.url, timeout=300)
    opts = {"temperature": 0, "seed": 1, "num_predict": 8}
    # the prompt opens <think> and SmolLM2 never closes it: all it writes is thinking
    thought = client.chat("smol-think", messages=[{"role": "user", "content": "Hi"}], options=opts)
    assert thought.message.thinking and thought.message.thinking.strip()
    assert thought.message.content == ""
    streamed = list(client.chat("smol-think", messages=[{"role": "user", "content": "Hi"}], options=opts,
                                stream=True))
    assert "".join(p.message.thinking or "" for p in streamed) == thought.message.thinking
    plain = client.chat("smol-think", messages=[{"role": "user", "content": "Hi"}], options=opts, think=False)
    assert plain.message.content.strip() and not plain.message.thinking
    status, gen = post(node, "/api/generate", {"model": "smol-think", "prompt": "Hi", "stream": False,
                                               "think": "high", "options": opts})
    assert status == 200 and gen["thinking"].strip() and gen["response"] == ""
    status, oa = post(node, "/v1/chat/completions", {"model": "smol-think", "max_tokens": 8, "seed": 1,
                                                     "temperature": 0, "reasoning_effort": "low",
                                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and oa["choices"][0]["message"]["reasoning"].strip()
    status, oa = post(node, "/v1/chat/completions", {"model": "smol-think", "max_tokens": 8, "reasoning_effort": "none",
                                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and "reasoning" not in oa["choices"][0]["message"]
    status, body = post(node, "/api/chat", {"model": "smol-think", "messages": [QUESTION], "tools": TOOLS})
    assert status == 400 and body["error"] == "smol-think:latest does not support tools"


@pytest.mark.parametrize("path,obj,needle", [
    ("/api/chat", {"model": MODEL, "messages": [QUESTION], "think": True},
     '"smollm2:135m" does not support thinking'),
    ("/api/chat", {"model": MODEL, "messages": [QUESTION], "think": "extreme"}, 'invalid think value: "extreme"'),
    ("/api/chat", {"model": MODEL, "messages": [QUESTION], "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "text"}}}}}]},
     "tools[0].function.parameters.properties.a.type is not a JSON Schema type"),
    ("/api/chat", {"model": MODEL, "messages": [QUESTION, {"role": "tool", "content": "x", "tool_call_id": "call_zz"}]},
     "messages[1].tool_call_id 'call_zz' matches no tool call"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [QUESTION, {"role": "tool", "content": "x",
                                                                      "tool_call_id": "call_zz"}]},
     "matches no tool call"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [QUESTION], "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not among the tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [QUESTION], "tools": [{"type": "function"}]},
     "tools[0].function must be an object"),
])
def test_bad_agent_input_is_400(node: NodeProc, path: str, obj: Any, needle: str) -> None:
    status, body = post(node, path, obj)
    assert status == 400, body
    msg = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert needle in msg


def test_null_and_unknown_options_are_ignored(node: NodeProc) -> None:
    """LangChain's OllamaEmbeddings sends every unset option as null."""
    status, body = post(node, "/api/embed", {"model": MODEL, "input": "hi", "options": {
        "stop": None, "temperature": None, "mirostat": None, "not_an_option": 1}})
    assert status == 200 and len(body["embeddings"][0]) == 576
    status, body = post(node, "/api/embed", {"model": MODEL, "input": "hi", "options": {"num_ctx": "big"}})
    assert status == 400 and "num_ctx" in body["error"]


@pytest.mark.parametrize("engine", ["ollama", "openai"])
def test_upstream_engines_pass_tools_and_think_through(node: NodeProc, tmp_path: Path, engine: str) -> None:
    """A node relaying to an upstream (here another node, over Ollama's or OpenAI's
    wire) sends tools, tool_choice and think on unchanged, and brings calls back."""
    n = start_node(tmp_path, "--engine", engine, "--upstream", node.url)
    try:
        status, body = post(n, "/api/chat", {"model": MODEL, "messages": [QUESTION], "tools": TOOLS,
                                             "tool_choice": "required", "stream": False, "options": OPTS})
        assert status == 200, body
        call = body["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather" and isinstance(call["function"]["arguments"]["city"], str)
        assert call["id"].startswith("call_")
        status, body = post(n, "/api/chat", {"model": MODEL, "messages": [QUESTION], "think": True})
        assert status == 400 and "does not support thinking" in body["error"]  # the upstream's own answer
    finally:
        n.stop()


def test_openapi_describes_tools_and_think(node: NodeProc) -> None:
    spec: Any = node.get("/api/openapi.json")

    def props(path: str) -> dict[str, Any]:
        p: dict[str, Any] = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"]
        return p

    assert {"tools", "tool_choice", "think"} <= set(props("/api/chat"))
    assert {"tools", "tool_choice"} <= set(props("/v1/chat/completions"))
    assert "think" in props("/api/generate")
    assert {"tool_calls", "tool_name", "tool_call_id", "thinking"} <= set(
        props("/api/chat")["messages"]["items"]["properties"])


JINJA_TOOLS = """\
{%- if tools %}<|im_start|>system
You can call functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer a call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}<|im_start|>assistant
"""


def test_tools_with_a_jinja_template(node: NodeProc) -> None:
    """A model whose template is Jinja (as a GGUF's is): tools rendered into it, the call read by its <tool_call>."""
    status, _ = post(node, "/api/create", {"model": "smol-jinja", "from": MODEL, "template": JINJA_TOOLS,
                                          "stream": False})
    assert status == 200
    status, shown = post(node, "/api/show", {"model": "smol-jinja"})
    assert shown["capabilities"] == ["completion", "embedding", "tools"]
    status, first = post(node, "/api/chat", {"model": "smol-jinja", "messages": [QUESTION], "tools": TOOLS,
                                             "tool_choice": "required", "stream": False, "options": OPTS})
    assert status == 200, first
    calls = first["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    msgs = [QUESTION, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": RESULT, "tool_call_id": calls[0]["id"]}]
    status, second = post(node, "/api/chat", {"model": "smol-jinja", "messages": msgs, "tools": TOOLS,
                                              "stream": False, "options": OPTS})
    assert status == 200 and second["prompt_eval_count"] > first["prompt_eval_count"] + 20
