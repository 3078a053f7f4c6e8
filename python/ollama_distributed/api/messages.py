"""The agents' part of the chat wire, shared by the Ollama and OpenAI APIs:
`think`, messages with tool calls and tool results, and a whole answer
(content, thinking, tool calls) collected from the engine's chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..engines.toolcalls import check_tool_messages, parse_tool_calls
from ..errors import BadRequestError
from .common import _aclose

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
        if m.get("images"):
            raise BadRequestError(f"{body.get('model')} does not support images")
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


class Answer:
    """A whole answer, for stream false."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    @property
    def content(self) -> str:
        return "".join(self.text)

    def message(self) -> dict[str, Any]:
        """The assistant message in Ollama's shape."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.thinking:
            msg["thinking"] = "".join(self.thinking)
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


async def collect_answer(source: AsyncIterator[dict[str, Any]]) -> Answer:
    answer = Answer()
    try:
        async for chunk in source:
            if "text" in chunk:
                answer.text.append(chunk["text"])
            if chunk.get("thinking"):
                answer.thinking.append(chunk["thinking"])
            if chunk.get("tool_calls"):
                answer.tool_calls.extend(chunk["tool_calls"])
            if chunk.get("done"):
                answer.final = chunk
    finally:
        await _aclose(source)
    return answer
