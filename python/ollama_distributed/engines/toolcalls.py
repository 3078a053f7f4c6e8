"""Tools: checking what clients send, reading calls out of a model's output,
splitting thinking from content, and the grammar that forces a call.

Parsing follows Ollama's rules (its `tools` and `thinking` packages are the
reference): text before the template's tool-call tag is content; after the
tag, every complete JSON object naming a known tool is a call (its arguments
under `arguments` or `parameters`, or under the tool's own name). A model
whose calls start with a bare `{` or `[` only gets them parsed when the
output starts with one; anything else is plain content.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Iterator
from typing import Any

from ..errors import BadRequestError

_ID_CHARS = string.ascii_lowercase + string.digits


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(8))


# ---- what clients send ---------------------------------------------------------------

_SCHEMA_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")


def validate_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]] | None:
    """A request's tools, checked: function tools with a name and a JSON
    Schema object for parameters. Raises a 400 naming what is wrong."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequestError(f"{where} must be a list of tools")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise BadRequestError(f"{at} must be an object")
        kind = tool.get("type", "function")
        if kind != "function":
            raise BadRequestError(f'{at}.type must be "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadRequestError(f"{at}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BadRequestError(f"{at}.function.name must be a non-empty string")
        if name in seen:
            raise BadRequestError(f"{at}.function.name {name!r} is given twice")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn.get("description"), str):
            raise BadRequestError(f"{at}.function.description must be a string")
        params = fn.get("parameters")
        if params is not None:
            _check_schema(params, f"{at}.function.parameters", top=True)
        out.append({**tool, "type": "function"})
    return out


def _check_schema(schema: Any, at: str, top: bool = False) -> None:
    if not isinstance(schema, dict):
        raise BadRequestError(f"{at} is not a JSON Schema: it must be an object")
    t = schema.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else t
        if not isinstance(types, list) or not types or not all(x in _SCHEMA_TYPES for x in types):
            raise BadRequestError(f"{at}.type is not a JSON Schema type: {json.dumps(t)} "
                                  f"(expected one of {', '.join(_SCHEMA_TYPES)}, or a list of them)")
        if top and "object" not in types:
            raise BadRequestError(f'{at}.type must be "object"')
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise BadRequestError(f"{at}.properties must be an object of schemas")
        for k, v in props.items():
            _check_schema(v, f"{at}.properties.{k}")
    req = schema.get("required")
    if req is not None and (not isinstance(req, list) or not all(isinstance(r, str) for r in req)):
        raise BadRequestError(f"{at}.required must be a list of property names")
    if schema.get("enum") is not None and not isinstance(schema["enum"], list):
        raise BadRequestError(f"{at}.enum must be a list")
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key) is not None:
            if not isinstance(schema[key], list):
                raise BadRequestError(f"{at}.{key} must be a list of schemas")
            for j, sub in enumerate(schema[key]):
                _check_schema(sub, f"{at}.{key}[{j}]")
    if isinstance(schema.get("items"), dict):
        _check_schema(schema["items"], f"{at}.items")


def validate_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> Any:
    """OpenAI's tool_choice: "auto" | "none" | "required" | {"type": "function", "function": {"name"}}."""
    if choice is None or choice == "auto":
        return None
    if choice in ("none", "required"):
        if choice == "required" and not tools:
            raise BadRequestError('tool_choice "required" needs tools')
        return choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequestError('tool_choice must be "auto", "none", "required" or '
                                  '{"type": "function", "function": {"name": ...}}')
        if not any(t["function"]["name"] == name for t in tools or []):
            raise BadRequestError(f"tool_choice names function {name!r}, which is not among the tools")
        return {"type": "function", "function": {"name": name}}
    raise BadRequestError('tool_choice must be "auto", "none", "required" or a function')


def check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Every `tool_call_id` of a tool result answers a call an earlier assistant
    message made. Calls without ids (a client that drops them, as the `ollama`
    Python client does) cannot be matched, so they make any id acceptable."""
    issued: set[str] = set()
    anonymous = False
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            if c.get("id"):
                issued.add(c["id"])
            else:
                anonymous = True
        tcid = m.get("tool_call_id")
        if m.get("role") == "tool" and tcid and tcid not in issued and not anonymous:
            raise BadRequestError(f"messages[{i}].tool_call_id {tcid!r} matches no tool call "
                                  "of an earlier assistant message")


def parse_tool_calls(raw: Any, at: str, arguments_as_text: bool = False) -> list[dict[str, Any]]:
    """An assistant message's tool_calls in Ollama's shape (arguments an object)."""
    if not isinstance(raw, list):
        raise BadRequestError(f"{at} must be a list")
    out = []
    for j, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequestError(f"{at}[{j}] must be an object with function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise BadRequestError(f"{at}[{j}].function.arguments is not valid JSON") from None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise BadRequestError(f"{at}[{j}].function.arguments must be an object")
        call: dict[str, Any] = {"function": {"index": fn.get("index", j) if isinstance(fn.get("index"), int)
                                             else j, "name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str) and c["id"]:
            call["id"] = c["id"]
        out.append(call)
    return out


# ---- reading calls out of the output -----------------------------------------------------------


class ToolCallParser:
    """Feed it the model's text as it streams; it returns content to show and calls found."""

    def __init__(self, tag: str, tools: list[dict[str, Any]]) -> None:
        self.tag = tag
        self.names = sorted({t["function"]["name"] for t in tools}, key=len, reverse=True)
        self.buffer = ""
        self.state = "looking"  # -> "calling" -> "done"
        self.count = 0

    def add(self, text: str) -> tuple[list[dict[str, Any]], str]:
        if self.state == "done":
            return [], text
        self.buffer += text
        content = ""
        if self.state == "looking":
            at, found = self._find_tag()
            if at < 0:
                content, self.buffer = self.buffer, ""
            else:
                content, self.buffer = self.buffer[:at], self.buffer[at:]
            if self.tag in ("{", "[") and content.strip():
                self.state = "done"  # JSON-call models: only output that starts with the call
                out, self.buffer = content + self.buffer, ""
                return [], out
            if not found:
                return [], content
            self.state = "calling"
        calls = []
        while (call := self._next_call()) is not None:
            calls.append(call)
        if self.tag in ("{", "[") and _balanced(self.buffer, self.tag):
            self.state = "done"
            content, self.buffer = content + self.buffer, ""
        return calls, content

    def flush(self) -> str:
        """What is left to show once the output ended."""
        if self.count or self.tag not in ("{", "["):
            return ""
        out, self.buffer = self.buffer, ""
        return out

    def _find_tag(self) -> tuple[int, bool]:
        i = self.buffer.find(self.tag)
        if i >= 0:
            return i, True
        for k in range(min(len(self.buffer), len(self.tag)), 0, -1):
            if self.buffer.endswith(self.tag[:k]):
                return len(self.buffer) - k, False  # maybe the start of the tag: hold it
        return -1, False

    def _next_call(self) -> dict[str, Any] | None:
        buf = self.buffer
        if not buf:
            return None
        # A name still arriving ("get" of "get_weather") waits for more text.
        for k in range(1, min(len(buf), len(self.names[0]) if self.names else 0) + 1):
            tail = buf[-k:]
            if any(len(tail) < len(n) and n.startswith(tail) for n in self.names):
                return None
        hits = [(buf.find(n), -len(n), n) for n in self.names if n in buf]
        if not hits:
            return None
        start, neg_len, name = min(hits)
        end = start - neg_len
        found = _find_arguments(buf, name)
        if found is None:
            return None
        args, obj_end = found
        end = max(end, obj_end)
        self.buffer = buf[end:]
        call = {"id": call_id(), "function": {"index": self.count, "name": name, "arguments": args}}
        self.count += 1
        return call


def _outside_strings(buf: str) -> Iterator[tuple[int, str]]:
    """The characters of JSON text that are not inside a string, with their index."""
    in_str = escaped = False
    for i, c in enumerate(buf):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            in_str = not in_str
        elif not in_str:
            yield i, c


def _find_arguments(buf: str, name: str) -> tuple[dict[str, Any], int] | None:
    """The first complete JSON object in buf that carries the call's arguments, and where it ends."""
    depth = 0
    start = -1
    for i, c in _outside_strings(buf):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}":
            depth = max(depth - 1, 0)
            if depth == 0 and start >= 0:
                try:
                    obj = json.loads(buf[start:i + 1])
                except ValueError:
                    start = -1
                    continue
                if not isinstance(obj, dict):
                    start = -1
                    continue
                args = _arguments_in(obj, name)
                return (args if args is not None else obj), i + 1
    return None


def _arguments_in(obj: dict[str, Any], name: str) -> dict[str, Any] | None:
    def as_map(v: Any) -> dict[str, Any] | None:
        if isinstance(v, dict):
            return v
        if isinstance(v, str):
            try:
                parsed = json.loads(v)
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None
        return None

    if "name" in obj:
        for key in ("arguments", "parameters"):
            if (found := as_map(obj.get(key))) is not None:
                return found
        return {}
    if (found := as_map(obj.get(name))) is not None:
        return found
    for v in obj.values():
        for child in (v if isinstance(v, list) else [v]):
            if isinstance(child, dict) and (found := _arguments_in(child, name)) is not None:
                return found
    return None


def _balanced(buf: str, tag: str) -> bool:
    open_c, close_c = ("{", "}") if tag == "{" else ("[", "]")
    depth = 0
    for _, c in _outside_strings(buf):
        if c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return True
    return False


# ---- thinking -------------------------------------------------------------------------------------


class ThinkingParser:
    """Splits `<think>…</think>` (or the template's own tags) from the content as text streams."""

    def __init__(self, opening: str, closing: str, opened: bool = False) -> None:
        self.opening = opening
        self.closing = closing
        self.acc = ""
        self.state = "thinking_start" if opened else "looking"

    def add(self, text: str) -> tuple[str, str]:
        """(thinking, content) safe to send now."""
        self.acc += text
        thinking: list[str] = []
        content: list[str] = []
        while True:
            t, c, again = self._eat()
            thinking.append(t)
            content.append(c)
            if not again:
                return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        """What is held back when the output ends."""
        acc, self.acc = self.acc, ""
        if self.state in ("thinking", "thinking_start"):
            return acc, ""
        if self.state == "looking" and self.opening.startswith(acc.strip()):
            return "", ""
        return "", acc

    def _eat(self) -> tuple[str, str, bool]:
        if self.state == "looking":
            trimmed = self.acc.lstrip()
            if trimmed.startswith(self.opening):
                self.acc = trimmed[len(self.opening):].lstrip()
                self.state = "thinking" if self.acc else "thinking_start"
                return "", "", True
            if not trimmed or self.opening.startswith(trimmed):
                return "", "", False  # whitespace, or the tag still arriving
            self.state = "done"
            out, self.acc = self.acc, ""
            return "", out, False
        if self.state == "thinking_start":
            trimmed, self.acc = self.acc.lstrip(), ""
            if not trimmed:
                return "", "", False
            self.state, self.acc = "thinking", trimmed
            return "", "", True
        if self.state == "thinking":
            acc = self.acc
            if self.closing in acc:
                thinking, rest = acc.split(self.closing, 1)
                rest = rest.lstrip()
                self.acc = ""
                self.state = "after" if not rest else "done"
                return thinking, rest, False
            hold = _overlap(acc, self.closing)
            self.acc = acc[len(acc) - hold:] if hold else ""
            return acc[:len(acc) - hold], "", False
        if self.state == "after":
            trimmed, self.acc = self.acc.lstrip(), ""
            if trimmed:
                self.state = "done"
            return "", trimmed, False
        out, self.acc = self.acc, ""
        return "", out, False


def _overlap(s: str, delim: str) -> int:
    for k in range(min(len(s), len(delim)), 0, -1):
        if s.endswith(delim[:k]):
            return k
    return 0


# ---- forcing a call ------------------------------------------------------------------------------------


def call_affixes(tag: str) -> tuple[str, str]:
    """What a forced call is wrapped in, for a template's tool-call tag."""
    if tag == "{":
        return "", ""
    if tag.startswith("[TOOL_CALLS]"):
        return "[TOOL_CALLS] [", "]"
    if tag.startswith("<") and tag.endswith(">"):
        return tag + "\n", "\n</" + tag[1:]
    if tag.endswith("["):
        return tag, "]"
    return tag + " ", ""


def call_schema(tools: list[dict[str, Any]], choice: Any, style: str = "arguments") -> dict[str, Any]:
    """The JSON Schema of one call to the chosen tool (or any tool, for "required")."""
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    alts = []
    defs: dict[str, Any] = {}
    for t in tools:
        params = dict(t["function"].get("parameters") or {"type": "object"})
        # "#/$defs/X" refers to the document's root, which is now the call: hoist them there
        defs.update(params.pop("$defs", None) or {})
        defs.update(params.pop("definitions", None) or {})
        if "properties" in params and "additionalProperties" not in params:
            params["additionalProperties"] = False  # only the declared arguments
        alts.append({"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                       style: params},
                     "required": ["name", style]})
    schema: dict[str, Any] = alts[0] if len(alts) == 1 else {"anyOf": alts}
    if defs:
        schema = {**schema, "$defs": defs, "definitions": defs}
    return schema


def call_grammar(tools: list[dict[str, Any]], choice: Any, tag: str, style: str = "arguments") -> str:
    """A GBNF grammar (llama.cpp's) that admits exactly one call, wrapped as the template writes calls."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = call_schema(tools, choice, style)
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema), prop_order=["name", style])
    except Exception as e:
        raise BadRequestError(f"tools: a parameters schema cannot be turned into a grammar: {e}") from e
    prefix, suffix = call_affixes(tag)
    lines = []
    for line in gbnf.splitlines():
        if line.startswith("root ::= "):
            line = "tool-call ::= " + line[len("root ::= "):]
        lines.append(line)
    root = " ".join(p for p in (_gbnf_literal(prefix), "tool-call", _gbnf_literal(suffix)) if p)
    return f"root ::= {root}\n" + "\n".join(lines)


def _gbnf_literal(s: str) -> str:
    if not s:
        return ""
    return json.dumps(s)


class OutputReader:
    """The model's text turned into chunks: thinking, tool calls, and content."""

    def __init__(self, think_tags: tuple[str, str] | None = None, thinking_open: bool = False,
                 tool_tag: str | None = None, tools: list[dict[str, Any]] | None = None) -> None:
        self.thinking = ThinkingParser(*think_tags, opened=thinking_open) if think_tags else None
        self.calls = ToolCallParser(tool_tag, tools) if tool_tag and tools else None

    def feed(self, text: str) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []
        if self.thinking is not None:
            thinking, text = self.thinking.add(text)
            if thinking:
                chunks.append({"thinking": thinking})
        self._content(text, chunks)
        return chunks

    def finish(self) -> list[dict[str, Any]]:
        chunks: list[dict[str, Any]] = []
        if self.thinking is not None:
            thinking, text = self.thinking.flush()
            if thinking:
                chunks.append({"thinking": thinking})
            self._content(text, chunks)
        if self.calls is not None:
            rest = self.calls.flush()
            if rest:
                chunks.append({"text": rest})
        return chunks

    def _content(self, text: str, chunks: list[dict[str, Any]]) -> None:
        if text and self.calls is not None:
            calls, text = self.calls.add(text)
            if calls:
                chunks.append({"tool_calls": calls})
        if text:
            chunks.append({"text": text})
