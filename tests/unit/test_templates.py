"""Ollama's Go templates: the language, Ollama's way of running them, and what
is read from them (capabilities, tool-call tag, thinking tags).

`data/ollama_templates.json` holds templates of Ollama's library families and
the renderings Ollama's own test data expects for them (ollama/ollama
`template/testdata`, and the tool renderings of `tools/testdata`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed.engines import goparse as gp
from ollama_distributed.engines import gotemplate as gt
from ollama_distributed.engines.templates import GoTemplate, capabilities, collate
from ollama_distributed.errors import BadRequestError, EngineError

DATA = json.loads((Path(__file__).parent / "data" / "ollama_templates.json").read_text())
# Ollama's own test trims one trailing space from these families' output.
TRAILING_SPACE = {"llama2-chat", "mistral-instruct", "vicuna", "chatqa", "openchat"}


@pytest.mark.parametrize("family", sorted(DATA["plain"]))
@pytest.mark.parametrize("conversation", sorted(DATA["conversations"]))
def test_library_families_render_as_ollama(family: str, conversation: str) -> None:
    case = DATA["plain"][family]
    got = GoTemplate(case["template"]).render(DATA["conversations"][conversation])
    if family in TRAILING_SPACE and got.endswith(" "):
        got = got[:-1]
    assert got == case["expected"][conversation]


@pytest.mark.parametrize("family", sorted(DATA["tools"]))
def test_tool_templates_render_as_ollama(family: str) -> None:
    """System, tools as JSON (Go's field order, map keys sorted), a past call
    with its arguments, a tool result, the answer, the next question."""
    case = DATA["tools"][family]
    got = GoTemplate(case["template"]).render(DATA["tool_messages"], DATA["tool_specs"])
    assert got == case["expected"]


@pytest.mark.parametrize("family,tag", [("qwen2.5", "<tool_call>"), ("llama3.2", "{"),
                                        ("mistral", "[TOOL_CALLS] ["), ("llama3-groq-tool-use", "<tool_call>"),
                                        ("command-r-plus", "Action: ```json\n[")])
def test_tool_call_tag(family: str, tag: str) -> None:
    assert GoTemplate(DATA["tools"][family]["template"]).tool_call_tag() == tag


def test_capabilities() -> None:
    assert capabilities(DATA["plain"]["llama3-instruct"]["template"]) == ["completion"]
    assert capabilities(DATA["tools"]["qwen2.5"]["template"]) == ["completion", "tools", "insert"]
    think = ("{{- range .Messages }}{{ if eq .Role \"assistant\" }}{{ if .Thinking }}<think>{{ .Thinking }}"
             "</think>{{ end }}{{ .Content }}{{ end }}{{ end }}")
    assert GoTemplate(think).thinking_tags() == ("<think>", "</think>")
    assert capabilities(think) == ["completion", "thinking"]
    assert capabilities("{% for m in messages %}{{ m.content }}{% endfor %}") == ["completion"]
    assert capabilities("{% if tools %}{{ tools | tojson }}{% endif %}<think></think>",
                        embedding_only=True) == ["embedding", "tools", "thinking"]


def test_think_values_reach_the_template() -> None:
    t = GoTemplate("{{ range .Messages }}{{ end }}{{ .Think }} {{ .ThinkLevel }} {{ .IsThinkSet }}")
    msgs = [{"role": "user", "content": "x"}]
    assert t.render(msgs) == "false  false"
    assert t.render(msgs, think=True) == "true medium true"
    assert t.render(msgs, think="high") == "true high true"
    assert t.render(msgs, think=False) == "false  true"


def test_legacy_template_runs_per_turn_and_stops_at_the_reply() -> None:
    t = GoTemplate("{{ if .System }}<s>{{ .System }}</s>{{ end }}[U]{{ .Prompt }}[A]{{ .Response }}[E]")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert t.render(msgs) == "<s>S</s>[U]a[A]b[E][U]c[A]"
    # a template without .Response gets it appended, as Ollama does
    assert GoTemplate("Q: {{ .Prompt }} A:").render([{"role": "user", "content": "hi"}]) == "Q: hi A:"


def test_suffix_renders_fill_in_the_middle() -> None:
    t = GoTemplate("{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{- else }}{{ .Prompt }}{{- end }}")
    assert t.render([], prompt="def add(", suffix="return x") == "<PRE> def add( <SUF>return x <MID>"
    assert t.render([{"role": "user", "content": "hello"}]) == "hello"
    assert "insert" in t.capabilities()


def test_collate_merges_turns_but_not_tool_results() -> None:
    system, msgs = collate([{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                            {"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                            {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}])
    assert system == "a\n\nb"
    assert [m["content"] for m in msgs] == ["a\n\nb", "x\n\ny", "1", "2"]


def run(src: str, data: Any = None, **funcs: Any) -> str:
    return gt.Template(src, {"json": gt.go_json, **funcs}).execute(data if data is not None else {})


@pytest.mark.parametrize("src,data,want", [
    ("a {{- .P -}} b", {"P": "X"}, "aXb"),
    ("a {{/* note */}} b {{- /* trimmed */ -}} c", {}, "a  bc"),
    ("{{ range $i, $m := .M }}{{ $i }}:{{ $m }} {{ end }}", {"M": ["x", "y"]}, "0:x 1:y "),
    ("{{ range $m := .M }}{{ $m }}{{ end }}", {"M": ["x", "y"]}, "xy"),
    ("{{ range .M }}{{ . }}{{ else }}none{{ end }}", {"M": []}, "none"),
    ("{{ range $k, $v := .D }}{{ $k }}={{ $v }};{{ end }}", {"D": {"b": 2, "a": 1}}, "a=1;b=2;"),
    ("{{ range 3 }}{{ . }}{{ end }}", {}, "012"),
    ("{{ range .M }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if eq . 4 }}{{ break }}{{ end }}{{ . }}{{ end }}",
     {"M": [1, 2, 3, 4, 5]}, "13"),
    ("{{ if eq .R \"a\" }}A{{ else if eq .R \"b\" }}B{{ else }}C{{ end }}", {"R": "b"}, "B"),
    ("{{ with .X }}[{{ . }}]{{ else with .Y }}({{ . }}){{ else }}-{{ end }}", {"X": "", "Y": 7}, "(7)"),
    ("{{ $s := \"\" }}{{ range .M }}{{ if not $s }}{{ $s = . }}{{ else }}{{ $s = printf \"%s+%s\" $s . }}"
     "{{ end }}{{ end }}{{ $s }}", {"M": ["a", "b", "c"]}, "a+b+c"),
    ("{{ and 1 0 }} {{ and 1 2 }} {{ or 0 \"\" }} {{ or 0 \"x\" }} {{ not .N }}", {}, "0 2  x true"),
    ("{{ and .Nil .Nil.Boom }}", {"Nil": None}, "<no value>"),  # and stops at the first empty value
    ("{{ lt 1 2 }} {{ le 2 2 }} {{ gt 1 2 }} {{ ge \"b\" \"a\" }} {{ ne 1 2 }} {{ eq 1 2 3 1 }}", {},
     "true true false true true true"),
    ("{{ len .M }} {{ len \"héllo\" }} {{ index .M 1 }} {{ slice .M 1 }} {{ index .D \"k\" }}",
     {"M": [1, 2, 3], "D": {"k": "v"}}, "3 6 2 [2 3] v"),
    ("{{ $last := eq (len (slice .M 1)) 2 }}{{ $last }}", {"M": [1, 2, 3]}, "true"),
    ("{{ (index .M 0).Name }} {{ $.T }}", {"M": [{"Name": "n"}], "T": "t"}, "n t"),
    ("{{ .M | len | printf \"%d items\" }}", {"M": [1, 2]}, "2 items"),
    ("{{ json .D }} {{ json \"<&>\" }}", {"D": {"b": 1.0, "a": [True, None]}}, '{"a":[true,null],"b":1} "\\u003c\\u0026\\u003e"'),
    ("{{ .Missing }}|{{ if .Missing }}y{{ else }}n{{ end }}", {}, "<no value>|n"),
    ("{{ .F }} {{ .L }} {{ .D }} {{ 1e6 }} {{ 0.5 }}", {"F": 2.5, "L": ["a", 1], "D": {"k": True}},
     "2.5 [a 1] map[k:true] 1e+06 0.5"),
    ("{{ print \"a\" 1 2 \"b\" }}|{{ println 1 \"x\" }}|{{ html \"<a&b>\" }}", {}, "a1 2b|1 x\n|&lt;a&amp;b&gt;"),
    ("{{ `raw\\n` }} {{ \"esc\\tx\" }} {{ 'a' }}", {}, "raw\\n esc\tx 97"),
])
def test_language(src: str, data: Any, want: str) -> None:
    assert run(src, data) == want


@pytest.mark.parametrize("src,needle", [
    ("{{ .Prompt ", "unclosed action"),
    ("{{ if .X }}x", "missing {{end}}"),
    ("{{ end }}", "unexpected {{end}}"),
    ("{{ nope .X }}", 'function "nope" not defined'),
    ('{{define "x"}}{{end}}', "not supported"),
    ("{{ .X | .Y }}", "non-function .Y"),
    ("{{ range .X }}{{ $last }}{{ end }}", "undefined variable: \\$last"),
    ("{{ if .X }}{{ $v := 1 }}{{ end }}{{ $v }}", "undefined variable: \\$v"),
    ("{{ $w = 1 }}", "undefined variable: \\$w"),
])
def test_parse_errors(src: str, needle: str) -> None:
    with pytest.raises(gp.TemplateError, match=needle):
        gt.Template(src).execute({"X": 1, "Y": 2})


def test_errors_at_render_name_the_problem() -> None:
    t = GoTemplate("{{ range .Messages }}{{ .Nope }}{{ end }}")
    with pytest.raises(EngineError, match="can't evaluate field Nope"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(BadRequestError, match="template:"):
        GoTemplate("{{ range .Messages }")


def test_tool_values_print_as_ollama() -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "required": ["a"],
        "properties": {"b": {"type": ["string", "null"]}, "a": {"type": "integer", "description": "x"}}}}}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"z": 1, "a": "<"}}}]}]
    t = GoTemplate("{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Name }}{{ .Function.Arguments }}"
                   "{{ range $k, $v := .Function.Arguments }}{{ $k }}={{ $v }};{{ end }}{{ end }}{{ end }}"
                   "{{ range .Tools }}{{ range $n, $p := .Function.Parameters.Properties }}{{ $n }}:{{ $p.Type }}"
                   " {{ toTypeScriptType $p }};{{ end }}{{ end }}")
    assert t.render(msgs, tools) == ('f{"a":"\\u003c","z":1}a=<;z=1;a:integer number;b:[string null] string | null;')


SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("conversation", sorted(DATA["conversations"]))
def test_default_model_template_matches_its_gguf_template_without_tools(conversation: str) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from ollama_distributed.models.catalog import DEFAULT_TEMPLATE

    msgs = DATA["conversations"][conversation]
    want = Jinja2ChatFormatter(SMOLLM2_JINJA, eos_token="<|im_end|>", bos_token="<|im_start|>")(
        messages=msgs).prompt
    assert GoTemplate(DEFAULT_TEMPLATE).render(msgs) == want


def test_default_model_template_renders_tools_and_calls() -> None:
    from ollama_distributed.models.catalog import DEFAULT_TEMPLATE

    t = GoTemplate(DEFAULT_TEMPLATE)
    assert capabilities(DEFAULT_TEMPLATE) == ["completion", "tools"]
    assert t.tool_call_tag() == "<tool_call>"
    got = t.render(DATA["tool_messages"], DATA["tool_specs"])
    assert got.startswith("<|im_start|>system\nYou are a knowledgeable assistant.")
    assert '<tools>\n{"type": "function", "function": {"name":"get_current_weather",' in got
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_current_weather", "arguments": '
            '{"format":"celsius","location":"Paris, France"}}\n</tool_call><|im_end|>\n') in got
    assert "<|im_start|>user\n<tool_response>\n22\n</tool_response><|im_end|>\n" in got
    assert got.endswith("<|im_start|>user\nWhat's the weather like today in San Francisco and Toronto?"
                        "<|im_end|>\n<|im_start|>assistant\n")


def test_a_hostile_template_is_bounded() -> None:
    with pytest.raises(gp.TemplateError, match="iterations"):
        run("{{ range 100000000 }}x{{ end }}")
    with pytest.raises(gp.TemplateError, match="output exceeds"):
        run('{{ $s := "xxxxxxxxxxxxxxxx" }}{{ range 1048576 }}{{ $s }}{{ $s }}{{ end }}')
