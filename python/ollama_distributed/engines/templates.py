"""Prompt templates: a model's Go template (Ollama's Modelfile TEMPLATE), or the
GGUF's own Jinja chat template when it has none.

The Go template runs as Ollama runs it (its `template` package is the
reference, re-derived here, see `gotemplate.py` for the language): messages
are collated (consecutive turns of one role merged, system messages joined
into `.System`), a template that ranges over `.Messages` gets them with
`.Tools` and `.Think`, and an older one that only knows
`.System`/`.Prompt`/`.Response` runs once per turn, the last turn cut after
`.Response`. The same tree tells what the model can do (`tools`, `insert`,
`thinking`), the tag its tool calls start with, and its thinking tags.
Where a model has both, the Go template wins over the GGUF's Jinja one.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequestError, EngineError
from ..models.store import ModelRecord
from . import goparse as gp
from . import gotemplate as gt
from .base import InferenceRequest

logger = logging.getLogger(__name__)


def _typescript(v: Any) -> str:
    if isinstance(v, gt.Struct) and v.type_name == "ToolProperty":
        return _ts_type(v)
    return "any"


def _ts_type(p: gt.Struct) -> str:
    any_of = p.fields.get("AnyOf") or []
    if any_of:
        return " | ".join(_ts_type(a) for a in any_of)
    types = list(p.fields.get("Type") or [])
    if not types:
        return "any"
    mapped = [_TS.get(t, "any") for t in types]
    if len(mapped) == 1:
        if types[0] == "array":
            items = p.fields.get("Items")
            inner = _ts_type(_property(items)) if isinstance(items, dict) else "any"
            return f"{inner}[]"
        return mapped[0]
    return " | ".join(mapped)


_TS = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
       "array": "any[]", "object": "Record<string, any>", "null": "null"}

FUNCS: dict[str, Any] = {
    "json": gt.go_json,
    "currentDate": lambda *a: datetime.date.today().isoformat(),
    "yesterdayDate": lambda *a: (datetime.date.today() - datetime.timedelta(days=1)).isoformat(),
    "toTypeScriptType": _typescript,
}


# ---- Ollama's values, as the template sees them ---------------------------------------


class PropertyType(list[str]):
    """A JSON Schema type: one name, or a list of them; prints as Go's does."""

    def go_string(self) -> str:
        if not self:
            return ""
        return self[0] if len(self) == 1 else "[" + " ".join(self) + "]"

    def to_json(self) -> Any:
        return self[0] if len(self) == 1 else list(self)


_PROP_TAGS = {"AnyOf": ("anyOf", True), "Type": ("type", True), "Items": ("items", True),
              "Description": ("description", True), "Enum": ("enum", True),
              "Properties": ("properties", True), "Required": ("required", True)}


class _OrderedProps(dict[str, Any]):
    def go_string(self) -> str:
        return gt.go_json(gt._Ordered(self))

    def to_json(self) -> Any:
        return gt._Ordered((k, gt.to_json(v)) for k, v in self.items())


def _property(p: dict[str, Any]) -> gt.Struct:
    t = p.get("type")
    nested = p.get("properties")
    return gt.Struct("ToolProperty", {
        "AnyOf": [_property(a) for a in p.get("anyOf") or [] if isinstance(a, dict)],
        "Type": PropertyType([t] if isinstance(t, str) else list(t or [])),
        "Items": p.get("items"),
        "Description": p.get("description") or "",
        "Enum": p.get("enum") or [],
        # nested properties keep their order (Ollama's ordered map); the top level is a Go map
        "Properties": _OrderedProps({k: _property(v) for k, v in nested.items()})
        if isinstance(nested, dict) else None,
        "Required": p.get("required") or [],
    }, _PROP_TAGS)


def template_tools(tools: list[dict[str, Any]] | None) -> gt.JSONList | None:
    if not tools:
        return None
    out = gt.JSONList()
    for tool in tools:
        fn = tool.get("function") or {}
        params = fn.get("parameters") or {}
        props = params.get("properties") or {}
        out.append(gt.Struct("templateTool", {
            "Type": tool.get("type") or "",
            "Items": tool.get("items"),
            "Function": gt.Struct("templateToolFunction", {
                "Name": fn.get("name") or "",
                "Description": fn.get("description") or "",
                "Parameters": gt.Struct("templateToolFunctionParameters", {
                    "Type": params.get("type") or "",
                    "Defs": params.get("$defs"),
                    "Items": params.get("items"),
                    "Required": params.get("required") or [],
                    "Properties": gt.JSONMap({k: _property(v) for k, v in props.items()
                                              if isinstance(v, dict)}),
                }, {"Type": ("type", False), "Defs": ("$defs", True), "Items": ("items", True),
                    "Required": ("required", True), "Properties": ("properties", False)}, stringer=True),
            }, {"Name": ("name", False), "Description": ("description", False),
                "Parameters": ("parameters", False)}, stringer=True),
        }, {"Type": ("type", False), "Items": ("items", True), "Function": ("function", False)},
            stringer=True))
    return out


def _args(args: Any) -> gt.JSONMap:
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            args = {}
    return gt.JSONMap(args if isinstance(args, dict) else {})


def template_message(m: dict[str, Any]) -> gt.Struct:
    calls = []
    for i, c in enumerate(m.get("tool_calls") or []):
        fn = c.get("function") or {}
        calls.append(gt.Struct("templateToolCall", {
            "ID": c.get("id") or "",
            "Function": gt.Struct("templateToolCallFunction", {
                "Index": fn.get("index", i) if isinstance(fn.get("index", i), int) else i,
                "Name": fn.get("name") or "",
                "Arguments": _args(fn.get("arguments")),
            }),
        }))
    return gt.Struct("*templateMessage", {
        "Role": m.get("role") or "",
        "Content": m.get("content") or "",
        "Thinking": m.get("thinking") or "",
        "Images": m.get("images") or [],
        "ToolCalls": calls,
        "ToolName": m.get("tool_name") or "",
        "ToolCallID": m.get("tool_call_id") or "",
    })


def collate(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Ollama's collation: system texts joined, and consecutive messages of one
    role merged (tool results stay apart: each carries its own name and id)."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") == "system":
            system.append(m.get("content") or "")
        if out and out[-1].get("role") == m.get("role") and m.get("role") != "tool":
            out[-1] = {**out[-1], "content": (out[-1].get("content") or "") + "\n\n" + (m.get("content") or "")}
        else:
            out.append(dict(m))
    return "\n\n".join(system), out


# ---- the template -----------------------------------------------------------------------


def _identifiers(nodes: list[Any]) -> list[str]:
    """The names a template refers to, as Ollama's Vars() collects them."""
    names: list[str] = []

    def pipe(p: gp.Pipe) -> None:
        for c in p.cmds:
            for a in c.args:
                if isinstance(a, gp.Field):
                    names.extend(a.names)
                elif isinstance(a, gp.Variable):
                    names.extend([a.name, *a.names])
                elif isinstance(a, gp.Pipe):
                    pipe(a)

    def visit(ns: list[Any]) -> None:
        for n in ns:
            if isinstance(n, gp.Action):
                pipe(n.pipe)
            elif isinstance(n, gp.Branch):
                pipe(n.pipe)
                visit(n.body)
                if n.else_body is not None:
                    visit(n.else_body)

    visit(nodes)
    return names


def _pipe_has_field(p: gp.Pipe, name: str) -> bool:
    return any(isinstance(a, gp.Field) and name in a.names for c in p.cmds for a in c.args)


def _response_action() -> gp.Action:
    return gp.Action(gp.Pipe([], False, [gp.Command([gp.Field(["Response"])])]))


class GoTemplate:
    """A model's Go template, with what Ollama reads from it."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self.tmpl = gt.Template(source, FUNCS)
        except gp.TemplateError as e:
            raise BadRequestError(f"template: {e}") from None
        self.vars = sorted({n.lower() for n in _identifiers(self.tmpl.root)})
        if "messages" not in self.vars and "response" not in self.vars:
            self.tmpl.root.append(_response_action())  # as Ollama: a prompt-only template gets the reply

    # what the model can do

    def capabilities(self) -> list[str]:
        return list(self._capabilities)

    @functools.cached_property
    def _capabilities(self) -> tuple[str, ...]:
        # computed once per parsed template: routing asks for every request
        caps = []
        if "tools" in self.vars:
            caps.append("tools")
        if "suffix" in self.vars:
            caps.append("insert")
        if all(self.thinking_tags()):
            caps.append("thinking")
        return tuple(caps)

    def tool_call_tag(self) -> str:
        """The text the model's tool calls start with: the first text in the
        template's `if .ToolCalls` branch, up to any `{`; `{` when there is none."""
        node = _find_tool_calls_if(self.tmpl.root)
        text = _first_text(node.body) if node is not None else None
        if text is None:
            return "{"
        tag = text.replace("\r\n", "\n").split("{", 1)[0].strip()
        return tag or "{"

    def thinking_tags(self) -> tuple[str, str]:
        """The texts around `.Thinking` inside a range over `.Messages`: the
        first and last texts of the innermost list holding it (Ollama's heuristic)."""
        return self._thinking_tags

    @functools.cached_property
    def _thinking_tags(self) -> tuple[str, str]:
        # a walk of the whole tree: once per parsed template, not per request
        opening = closing = ""
        ancestors: list[Any] = []

        def pipe_fields(p: gp.Pipe) -> list[gp.Field]:
            out: list[gp.Field] = []
            for c in p.cmds:
                for a in c.args:
                    if isinstance(a, gp.Field):
                        out.append(a)
                    elif isinstance(a, gp.Pipe):
                        out.extend(pipe_fields(a))
            return out

        def found() -> None:
            nonlocal opening, closing
            rng = next((a for a in reversed(ancestors) if isinstance(a, gp.Branch) and a.kind == "range"), None)
            if rng is None or not any(f.names[0] == "Messages" for f in pipe_fields(rng.pipe)):
                return
            lst = next((a for a in reversed(ancestors) if isinstance(a, list)), None)
            if not lst:
                return
            if isinstance(lst[0], gp.Text):
                opening = lst[0].text.strip()
            if isinstance(lst[-1], gp.Text):
                closing = lst[-1].text.strip()

        def visit_pipe(p: gp.Pipe) -> None:
            for f in pipe_fields(p):
                if f.names and f.names[0] == "Thinking":
                    found()

        def visit(nodes: list[Any]) -> None:
            ancestors.append(nodes)
            for n in nodes:
                ancestors.append(n)
                if isinstance(n, gp.Action):
                    visit_pipe(n.pipe)
                elif isinstance(n, gp.Branch):
                    visit_pipe(n.pipe)
                    visit(n.body)
                    if n.else_body is not None:
                        visit(n.else_body)
                ancestors.pop()
            ancestors.pop()

        visit(self.tmpl.root)
        return opening, closing

    # rendering

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               think: Any = None, prompt: str = "", suffix: str = "") -> str:
        think_on = _think_bool(think)
        level = _think_level(think)
        base = {"Think": think_on, "ThinkLevel": level, "IsThinkSet": think is not None}
        try:
            if prompt and suffix:
                return self.tmpl.execute({"Prompt": prompt, "Suffix": suffix, "Response": "", **base})
            system, msgs = collate(messages)
            if "messages" in self.vars:
                return self.tmpl.execute({"System": system, "Messages": [template_message(m) for m in msgs],
                                          "Tools": template_tools(tools), "Response": "", **base})
            return self._legacy(msgs, base)
        except gp.TemplateError as e:
            raise EngineError(f"template: {e}") from None

    def _legacy(self, msgs: list[dict[str, Any]], base: dict[str, Any]) -> str:
        """One run per turn of a .System/.Prompt/.Response template; the last is
        cut after .Response so the model writes the reply."""
        out: list[str] = []
        system = prompt = response = ""

        def run(root: list[Any] | None = None) -> None:
            nonlocal system, prompt, response
            out.append(self.tmpl.execute({"System": system, "Prompt": prompt, "Response": response, **base},
                                         root))
            system = prompt = response = ""

        for m in msgs:
            role, content = m.get("role"), m.get("content") or ""
            if role == "system":
                if prompt or response:
                    run()
                system = content
            elif role == "user":
                if response:
                    run()
                prompt = content
            elif role == "assistant":
                response = content
        run(_cut_after_response(self.tmpl.root))
        return "".join(out)


def _think_bool(think: Any) -> bool:
    return think is True or think in ("high", "medium", "low", "max")


def _think_level(think: Any) -> str:
    if isinstance(think, str):
        return think
    return "medium" if think is True else ""


def _cut_after_response(nodes: list[Any]) -> list[Any]:
    cut = False

    def visit(ns: list[Any]) -> list[Any]:
        nonlocal cut
        kept: list[Any] = []
        for n in ns:
            if cut:
                continue
            if isinstance(n, gp.Action):
                if _pipe_has_field(n.pipe, "Response"):
                    cut = True
                kept.append(n)
            elif isinstance(n, gp.Branch):
                body = visit(n.body)
                else_body = visit(n.else_body) if n.else_body is not None else None
                kept.append(gp.Branch(n.kind, n.pipe, body, else_body))
            else:
                kept.append(n)
        return kept

    return visit(nodes)


def _find_tool_calls_if(nodes: list[Any]) -> gp.Branch | None:
    for n in nodes:
        if not isinstance(n, gp.Branch):
            continue
        if n.kind == "if" and _pipe_has_field(n.pipe, "ToolCalls"):
            return n
        for sub in (n.body, n.else_body):
            if sub is not None and (found := _find_tool_calls_if(sub)) is not None:
                return found
    return None


def _first_text(nodes: list[Any]) -> str | None:
    for n in nodes:
        if isinstance(n, gp.Text):
            if n.text.strip():
                return n.text
            continue
        if isinstance(n, gp.Branch):
            for sub in (n.body, n.else_body):
                if sub is not None and (t := _first_text(sub)) is not None:
                    return t
            return None
        if isinstance(n, gp.Action):
            return None
    return None


@functools.lru_cache(maxsize=64)
def parse(source: str) -> GoTemplate:
    return GoTemplate(source)


def is_jinja(template: str) -> bool:
    return "{%" in template or ("messages" in template and "{{ ." not in template and "{{- ." not in template)


# ---- what a model can do ---------------------------------------------------------------------


def jinja_capabilities(template: str) -> list[str]:
    """Ollama's reading of a GGUF chat template."""
    caps = []
    if "tools" in template or "tool_call" in template:
        caps.append("tools")
    if "<think>" in template and "</think>" in template:
        caps.append("thinking")
    return caps


def model_template(record: ModelRecord, gguf_template: str | None) -> str:
    """The template a model renders with: its own (Go or Jinja), else the GGUF's."""
    return record.template or gguf_template or ""


def capabilities(template: str, embedding_only: bool = False) -> list[str]:
    """`completion` (or `embedding` for an embedding-only model), then what the template allows."""
    caps = ["embedding"] if embedding_only else ["completion"]
    if not template:
        return caps
    if is_jinja(template):
        extra = jinja_capabilities(template)
    else:
        try:
            extra = parse(template).capabilities()
        except BadRequestError:
            logger.warning("model template contains errors")
            extra = []
    return caps + [c for c in extra if c not in caps]


# ---- rendering a request ------------------------------------------------------------------------


@dataclass
class Prompt:
    """A rendered request and how to read the model's output."""

    text: str
    stops: list[str]
    add_bos: bool
    think_tags: tuple[str, str] | None = None  # split thinking from content with these
    thinking_open: bool = False  # the prompt already opened the thinking section
    tool_tag: str | None = None  # parse tool calls starting with this
    tool_style: str = "arguments"  # the key a call's arguments go under


def chat_messages(record: ModelRecord, req: InferenceRequest) -> list[dict[str, Any]]:
    """The conversation as the template sees it: the model's system prompt first
    unless the request starts with its own (Ollama's rule)."""
    if req.kind == "chat":
        msgs = [dict(m) for m in req.messages]
        if record.system and (not msgs or msgs[0].get("role") != "system"):
            msgs.insert(0, {"role": "system", "content": record.system})
        return msgs
    msgs = []
    system = req.system if req.system else record.system
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": req.prompt})
    return msgs


def _token_text(llama: Any, token: int) -> str:
    if token < 0:
        return ""
    text: str = llama._model.token_get_text(token)
    return text


def render_prompt(llama: Any, record: ModelRecord, req: InferenceRequest) -> Prompt:
    """The prompt for a request, its extra stop strings, whether to add BOS when
    tokenising, and how to read the output. A request for tools or thinking
    that the model's template cannot take is refused with Ollama's wording."""
    if req.kind == "generate" and req.raw:
        return Prompt(req.prompt, [], True)
    template = req.template or record.template
    source = template or llama.metadata.get("tokenizer.chat_template") or ""
    caps = capabilities(source)
    if req.tools and "tools" not in caps:
        raise BadRequestError(f"{req.model} does not support tools")
    tools = req.tools if req.tool_choice != "none" else None
    think = req.think
    if "thinking" in caps:
        if think is None:
            think = True  # Ollama thinks by default on a thinking model
    elif _think_bool(think):
        raise BadRequestError(f"{json.dumps(req.model)} does not support thinking")
    msgs = chat_messages(record, req)
    if template and not is_jinja(template):
        t = parse(template)
        suffix = req.suffix if req.kind == "generate" else ""
        text = t.render(msgs, tools, think, prompt=req.prompt if suffix else "", suffix=suffix)
        out = Prompt(text, [], True)
        opening, closing = t.thinking_tags()
        if _think_bool(think) and opening and closing:
            out.think_tags = (opening, closing)
            out.thinking_open = text.rstrip().endswith(opening)
        if tools:
            out.tool_tag = t.tool_call_tag()
            out.tool_style = "parameters" if '"parameters"' in template and out.tool_tag == "{" else "arguments"
        return out
    if not source:
        raise BadRequestError(
            f"model '{record.name.short}' has no chat template; "
            "create it with a template or use raw mode"
        )
    text, add_bos = _render_jinja(llama, source, msgs, tools, think)
    eos = _token_text(llama, llama.token_eos())
    out = Prompt(text, [eos] if eos else [], add_bos)
    if _think_bool(think) and "thinking" in caps:
        out.think_tags = ("<think>", "</think>")
        out.thinking_open = text.rstrip().endswith("<think>")
    if tools:
        out.tool_tag = ("<tool_call>" if "<tool_call>" in source
                        else "[TOOL_CALLS]" if "[TOOL_CALLS]" in source else "{")
        out.tool_style = "parameters" if '"parameters"' in source and out.tool_tag == "{" else "arguments"
    return out


def _jinja_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as Hugging Face chat templates expect it."""
    out: dict[str, Any] = {"role": m.get("role"), "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c.get("id", ""), "type": "function",
             "function": {"name": (c.get("function") or {}).get("name", ""),
                          "arguments": _args((c.get("function") or {}).get("arguments"))}}
            for c in m["tool_calls"]]
    if m.get("tool_call_id"):
        out["tool_call_id"] = m["tool_call_id"]
    if m.get("tool_name"):
        out["name"] = m["tool_name"]
    if m.get("thinking"):
        out["reasoning_content"] = m["thinking"]
    return out


def _render_jinja(llama: Any, source: str, msgs: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None, think: Any) -> tuple[str, bool]:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos = llama.token_eos()
    formatter = Jinja2ChatFormatter(
        template=source,
        eos_token=_token_text(llama, eos),
        bos_token=_token_text(llama, llama.token_bos()),
        stop_token_ids=[eos],
    )
    extra: dict[str, Any] = {}
    if think is not None:
        extra["enable_thinking"] = _think_bool(think)
    try:
        result = formatter(messages=[_jinja_message(m) for m in msgs],  # type: ignore[misc]
                           tools=tools or None, **extra)  # type: ignore[arg-type]
    except Exception as e:
        raise BadRequestError(f"failed to render the chat template: {e}") from e
    return result.prompt, not result.added_special
