"""The agents' part of the chat wire, shared by the Ollama and OpenAI APIs:
`think`, and messages with tool calls and tool results. A whole answer is
collected by `common.gather`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..engines.toolcalls import check_tool_messages, parse_tool_calls, validate_tools
from ..errors import BadRequestError
from .common import field, images, refuse_images

THINK_LEVELS = ("high", "medium", "low", "max")
ROLES = ("system", "user", "assistant", "tool")


def parse_think(body: dict[str, Any]) -> Any:
    """Ollama's `think`: a boolean or a level; anything else is a 400 in Ollama's words."""
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return think
    if isinstance(think, str):
        if think in THINK_LEVELS:
            return think
        raise BadRequestError(f'invalid think value: "{think}" (must be "high", "medium", "low", "max", '
                              "true, or false)")
    raise BadRequestError('think must be a boolean or string ("high", "medium", "low", "max", true, or false)')


def ollama_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """/api/chat messages: role, content, images (refused: no vision model), thinking,
    tool_calls (arguments an object), tool_name and tool_call_id."""
    msgs = body.get("messages")
    if msgs is None:
        msgs = []
    if not isinstance(msgs, list):
        raise BadRequestError("messages has the wrong type: expected list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequestError(f"messages[{i}] must be an object")
        role = m.get("role")
        if isinstance(role, str):
            role = role.lower()  # as Ollama reads it
        if role not in ROLES:
            raise BadRequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        content = m.get("content", "")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequestError(f"messages[{i}].content must be a string")
        if images(m.get("images"), f"messages[{i}].images"):
            refuse_images(str(body.get("model")))
        msg: dict[str, Any] = {"role": role, "content": content}
        for key in ("thinking", "tool_name", "tool_call_id"):
            value = m.get(key)
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise BadRequestError(f"messages[{i}].{key} must be a string")
            msg[key] = value
        if m.get("tool_calls"):
            msg["tool_calls"] = parse_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        out.append(msg)
    check_tool_messages(out)
    return out


def function_tools(body: dict[str, Any],
                   read: Callable[[dict[str, Any], str], tuple[Any, Any, Any]]) -> list[dict[str, Any]] | None:
    """`tools` of an API whose tools are flat (Anthropic's, the Responses API's)
    as Ollama's function tools, checked like every API's (`validate_tools`).
    `read(tool, where)` checks the API's own shape and gives (name, description,
    JSON Schema of the arguments)."""
    raw = field(body, "tools", list)
    if not raw:
        return None
    tools = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise BadRequestError(f"{where} must be an object")
        name, description, schema = read(t, where)
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"{where}.name is required")
        tools.append({"type": "function", "function": {"name": name, "description": description or "",
                                                       "parameters": schema}})
    return validate_tools(tools)
