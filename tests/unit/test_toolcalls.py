"""Reading tool calls and thinking out of a model's streamed text; checking tools."""

from __future__ import annotations

from typing import Any

import pytest
from ollama_distributed.engines.toolcalls import (
    OutputReader,
    ThinkingParser,
    ToolCallParser,
    call_grammar,
    check_tool_messages,
    validate_tool_choice,
    validate_tools,
)
from ollama_distributed.errors import BadRequestError

TOOLS = validate_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {}}}},
])
assert TOOLS is not None


def feed(parser: Any, text: str, step: int) -> tuple[list[dict[str, Any]], str]:
    calls: list[dict[str, Any]] = []
    content = ""
    for i in range(0, len(text), step):
        c, t = parser.add(text[i:i + step])
        calls += c
        content += t
    return calls, content + parser.flush()


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_hermes_calls_stream_in_any_pieces(step: int) -> None:
    text = ('Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>')
    calls, content = feed(ToolCallParser("<tool_call>", TOOLS), text, step)
    assert content == "Sure."
    assert [(c["function"]["name"], c["function"]["arguments"], c["function"]["index"]) for c in calls] == [
        ("get_weather", {"city": "Paris"}, 0), ("get", {}, 1)]
    assert all(c["id"].startswith("call_") and len(c["id"]) == 13 for c in calls)


@pytest.mark.parametrize("step", [1, 1000])
def test_llama3_json_and_mistral_calls(step: int) -> None:
    calls, content = feed(ToolCallParser("{", TOOLS),
                          '{"name": "get_weather", "parameters": {"city": "Oslo"}}', step)
    assert content == "" and calls[0]["function"]["arguments"] == {"city": "Oslo"}
    calls, content = feed(ToolCallParser("[TOOL_CALLS] [", TOOLS),
                          '[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]', step)
    assert content == "" and calls[0]["function"]["arguments"] == {"city": "Rome"}


def test_json_style_model_answering_in_prose_is_content() -> None:
    calls, content = feed(ToolCallParser("{", TOOLS), "The weather {is} fine.", 2)
    assert calls == [] and content == "The weather {is} fine."
    calls, content = feed(ToolCallParser("{", TOOLS), '{"answer": 42}', 1000)
    assert calls == [] and content == '{"answer": 42}'


@pytest.mark.parametrize("step", [1, 2, 1000])
def test_thinking_is_split_from_content(step: int) -> None:
    p = ThinkingParser("<think>", "</think>")
    thinking = content = ""
    for i in range(0, len(text := "  <think> hmm, 2+2\n</think>\n\n4"), step):
        t, c = p.add(text[i:i + step])
        thinking, content = thinking + t, content + c
    t, c = p.flush()
    assert (thinking + t, content + c) == ("hmm, 2+2\n", "4")
    p = ThinkingParser("<think>", "</think>")
    assert p.add("no thinking here") == ("", "no thinking here")
    p = ThinkingParser("<think>", "</think>", opened=True)  # the prompt opened it
    assert p.add("a</think>b") == ("a", "b")


def test_output_reader_chunks() -> None:
    r = OutputReader(("<think>", "</think>"), False, "<tool_call>", TOOLS)
    chunks = r.feed('<think>x</think>ok<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>')
    chunks += r.finish()
    assert chunks[0] == {"thinking": "x"}
    assert {"text": "ok"} in chunks
    assert next(c for c in chunks if "tool_calls" in c)["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("tools,needle", [
    ("x", "tools must be a list"),
    ([{"type": "retrieval"}], 'tools[0].type must be "function"'),
    ([{"function": {"name": ""}}], "function.name must be a non-empty string"),
    ([{"function": {"name": "f", "parameters": "object"}}], "is not a JSON Schema"),
    ([{"function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "str"}}}}}],
     "properties.a.type is not a JSON Schema type"),
    ([{"function": {"name": "f", "parameters": {"type": "string"}}}], 'parameters.type must be "object"'),
    ([{"function": {"name": "f", "parameters": {"type": "object", "required": "a"}}}], "required must be"),
    ([{"function": {"name": "f"}}, {"function": {"name": "f"}}], "given twice"),
])
def test_bad_tools_are_400_naming_the_problem(tools: Any, needle: str) -> None:
    with pytest.raises(BadRequestError) as e:
        validate_tools(tools)
    assert needle in e.value.message


def test_tool_choice_and_tool_messages() -> None:
    assert validate_tool_choice("auto", TOOLS) is None
    assert validate_tool_choice({"type": "function", "function": {"name": "get"}}, TOOLS)["function"]["name"] == "get"
    with pytest.raises(BadRequestError, match="not among the tools"):
        validate_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(BadRequestError, match="needs tools"):
        validate_tool_choice("required", None)
    msgs = [{"role": "assistant", "tool_calls": [{"id": "call_1", "function": {"name": "get"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "x"}]
    check_tool_messages(msgs)
    with pytest.raises(BadRequestError, match=r"messages\[1\].tool_call_id 'call_2' matches no tool call"):
        check_tool_messages([msgs[0], {**msgs[1], "tool_call_id": "call_2"}])
    with pytest.raises(BadRequestError, match="matches no tool call"):
        check_tool_messages([{"role": "user", "content": "q"}, msgs[1]])
    # calls whose ids a client dropped cannot be matched: any id goes
    check_tool_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "get"}}]}, msgs[1]])


def test_call_grammar_wraps_a_call_in_the_template_tag() -> None:
    g = call_grammar(TOOLS, "required", "<tool_call>")
    assert g.startswith('root ::= "<tool_call>\\n" tool-call "\\n</tool_call>"\n')
    assert "get_weather" in g and "tool-call ::= " in g
    named = call_grammar(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, "{", "parameters")
    assert named.startswith("root ::= tool-call\n") and '\\"get\\"' not in named and "parameters" in named


def test_call_grammar_keeps_schema_references() -> None:
    """Pydantic-made schemas refer to "#/$defs/...": they still resolve inside the call."""
    tools = validate_tools([{"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "$defs": {"Seat": {"type": "string", "enum": ["aisle", "window"]}},
        "properties": {"seat": {"$ref": "#/$defs/Seat"}}, "required": ["seat"]}}}])
    assert tools is not None
    g = call_grammar(tools, "required", "<tool_call>")
    assert '\\"aisle\\"' in g or "aisle" in g
