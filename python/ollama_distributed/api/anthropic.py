"""Anthropic's Messages API (`POST /v1/messages`), what coding agents speak to
Ollama: wire format in, InferenceRequest out, and back, as Ollama's own
`anthropic/` layer translates it. System prompt, text / image / tool_use /
tool_result / thinking blocks, tools and tool_choice, thinking, streaming
events (message_start, content_block_start/delta/stop, message_delta,
message_stop) and usage. Anything this layer does not know is a 400 naming
where it is, never dropped silently."""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engines.base import InferenceRequest
from ..errors import BadRequestError, OllamaDistributedError
from .common import field, gather, images, read_json, refuse_images, stream_lines
from .messages import function_tools

if TYPE_CHECKING:
    from ..node import Node

SSE = "text/event-stream"
ROLES = ("user", "assistant")
BLOCKS = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")
# Anthropic's error types by status, as its SDKs map them to exception classes.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def _node(request: web.Request) -> Node:
    node: Node = request.app["node"]
    return node


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


# ---- request ------------------------------------------------------------------------


def _text_of(value: Any, where: str) -> str:
    """A string, or a list of text blocks joined (system prompts, tool results)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequestError(f"{where} must be a string or a list of text blocks")
    parts = []
    for j, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise BadRequestError(f"{where}[{j}]: expected a text block, got {kind!r}")
        text = block.get("text")
        if not isinstance(text, str):
            raise BadRequestError(f"{where}[{j}].text is required")
        parts.append(text)
    return "".join(parts)


def _image(block: dict[str, Any], where: str, model: str) -> None:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") not in ("base64", "url"):
        raise BadRequestError(f"{where}.source must be an object of type base64 or url")
    if source["type"] == "base64":
        if not isinstance(source.get("data"), str):
            raise BadRequestError(f"{where}.source.data is required")
        images([source["data"]], f"{where}.source.data")
    refuse_images(model)


def _messages(body: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """Anthropic messages as Ollama's: tool_use blocks become the assistant's
    `tool_calls`, tool_result blocks `role: tool` messages before the user's text."""
    raw = field(body, "messages", list, required=True)
    if not raw:
        raise BadRequestError("messages must not be empty")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        prompt = _text_of(system, "system")
        if prompt:
            out.append({"role": "system", "content": prompt})
    calls: set[str] = set()  # tool_use ids seen so far: a tool_result must answer one
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequestError(f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequestError(f"{where}.role must be one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequestError(f"{where}.content must be a string or a list of content blocks")
        text: list[str] = []
        thinking: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(block, dict):
                raise BadRequestError(f"{at} must be an object")
            kind = block.get("type")
            if kind not in BLOCKS:
                raise BadRequestError(f"{at}.type: unknown content block type {kind!r}; "
                                      f"expected one of {', '.join(BLOCKS)}")
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise BadRequestError(f"{at}.text is required")
                text.append(block["text"])
            elif kind == "image":
                _image(block, at, model)
            elif kind == "tool_use":
                if role != "assistant":
                    raise BadRequestError(f"{at}: tool_use blocks belong to assistant messages")
                for key in ("id", "name"):
                    if not isinstance(block.get(key), str) or not block[key]:
                        raise BadRequestError(f"{at}.{key} is required")
                args = block.get("input", {})
                if not isinstance(args, dict):
                    raise BadRequestError(f"{at}.input must be an object")
                calls.add(block["id"])
                tool_calls.append({"id": block["id"], "function": {"index": len(tool_calls),
                                                                    "name": block["name"], "arguments": args}})
            elif kind == "tool_result":
                if role != "user":
                    raise BadRequestError(f"{at}: tool_result blocks belong to user messages")
                use_id = block.get("tool_use_id")
                if not isinstance(use_id, str) or not use_id:
                    raise BadRequestError(f"{at}.tool_use_id is required")
                if use_id not in calls:
                    raise BadRequestError(f"{at}.tool_use_id {use_id!r} matches no earlier tool_use block")
                result = block.get("content", "")
                results.append({"role": "tool", "content": _text_of(result, f"{at}.content"),
                                "tool_call_id": use_id})
            elif kind == "thinking":
                if isinstance(block.get("thinking"), str):
                    thinking.append(block["thinking"])
            # redacted_thinking: opaque to us, as to any model but Anthropic's
        out.extend(results)  # a tool's answer comes before what the user adds to it
        if text or tool_calls or thinking or not results:
            msg: dict[str, Any] = {"role": role, "content": "".join(text)}
            if tool_calls:
                msg["tool_calls"] = tool_calls
            if thinking:
                msg["thinking"] = "".join(thinking)
            out.append(msg)
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    def read(t: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
        if t.get("type") not in (None, "custom"):
            raise BadRequestError(f"{where}.type {t.get('type')!r} is not supported: only custom tools "
                                  "(name, description, input_schema)")
        if not isinstance(t.get("name"), str) or not t.get("name"):
            raise BadRequestError(f"{where}.name is required")
        if not isinstance(t.get("input_schema"), dict):
            raise BadRequestError(f"{where}.input_schema must be a JSON Schema object")
        return t["name"], t.get("description"), t["input_schema"]

    return function_tools(body, read)


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> Any:
    choice = field(body, "tool_choice", dict)
    if choice is None:
        return None
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "none":
        return "none"
    if kind == "any":
        return "required"
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools or []}:
            raise BadRequestError("tool_choice.name must name one of the tools")
        return {"type": "function", "function": {"name": name}}
    raise BadRequestError("tool_choice.type must be one of auto, any, tool, none")


def _think(body: dict[str, Any]) -> Any:
    thinking = field(body, "thinking", dict)
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind == "enabled":
        return True
    if kind == "disabled":
        return False
    raise BadRequestError("thinking.type must be enabled or disabled")


def _options(body: dict[str, Any]) -> dict[str, Any]:
    max_tokens = field(body, "max_tokens", int, required=True)
    if max_tokens < 1:
        raise BadRequestError("max_tokens must be at least 1")
    opts: dict[str, Any] = {"num_predict": max_tokens}
    for key in ("temperature", "top_p"):
        value = field(body, key, (int, float))
        if value is not None:
            opts[key] = value
    top_k = field(body, "top_k", int)
    if top_k is not None:
        opts["top_k"] = top_k
    stop = field(body, "stop_sequences", list)
    if stop:
        if not all(isinstance(s, str) for s in stop):
            raise BadRequestError("stop_sequences must be a list of strings")
        opts["stop"] = stop
    return opts


def parse(body: dict[str, Any]) -> InferenceRequest:
    model = field(body, "model", str, required=True)
    tools = _tools(body)
    return InferenceRequest(kind="chat", model=model, messages=_messages(body, model), options=_options(body),
                            tools=tools, tool_choice=_tool_choice(body, tools), think=_think(body),
                            stream=field(body, "stream", bool, False))


# ---- response -----------------------------------------------------------------------


def _stop_reason(final: dict[str, Any], called: bool) -> str:
    if called:
        return "tool_use"
    return "max_tokens" if final.get("done_reason") == "length" else "end_turn"


def _usage(final: dict[str, Any]) -> dict[str, int]:
    # as Anthropic's: input_tokens leaves out what was read from a cache (a warm prefix)
    return {"input_tokens": int(final.get("prompt_eval_count") or 0),
            "cache_read_input_tokens": int(final.get("prompt_cached_count") or 0),
            "output_tokens": int(final.get("eval_count") or 0)}


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function", {})
    return {"type": "tool_use", "id": call.get("id") or "toolu_" + secrets.token_hex(12),
            "name": fn.get("name", ""), "input": fn.get("arguments") or {}}


def estimate_tokens(req: InferenceRequest) -> int:
    """About four characters a token, as Ollama estimates message_start's input
    tokens (agents show a context gauge from it; message_delta has the count)."""
    size = sum(len(str(m.get("content") or "")) + len(json.dumps(m.get("tool_calls") or []))
               for m in req.messages)
    size += len(json.dumps(req.tools)) if req.tools else 0
    return max(1, size // 4)


class _Events:
    """Engine chunks to Anthropic's stream events: one content block at a time,
    thinking, then text, then each tool call as a whole block."""

    def __init__(self, mid: str, model: str, estimate: int) -> None:
        self.mid, self.model = mid, model
        self.estimate = estimate  # input tokens for message_start, before the engine has counted them
        self.started = False
        self.index = -1
        self.open: str | None = None  # the open block's type
        self.called = False

    def _start(self, block: dict[str, Any]) -> bytes:
        out = self._stop()
        self.index += 1
        self.open = block["type"]
        return out + _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                    "content_block": block})

    def _stop(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def render(self, chunk: dict[str, Any]) -> bytes:
        out = b""
        if not self.started:
            self.started = True
            out += _event("message_start", {"type": "message_start", "message": {
                "id": self.mid, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": int(chunk.get("prompt_eval_count") or self.estimate),
                          "output_tokens": 0}}})
            out += _event("ping", {"type": "ping"})
        if chunk.get("thinking"):
            if self.open != "thinking":
                out += self._start({"type": "thinking", "thinking": "", "signature": ""})
            out += self._delta({"type": "thinking_delta", "thinking": chunk["thinking"]})
        if chunk.get("text"):
            if self.open != "text":
                out += self._start({"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": chunk["text"]})
        for call in chunk.get("tool_calls") or []:
            self.called = True
            use = _tool_use(call)
            out += self._start({**use, "input": {}})
            out += self._delta({"type": "input_json_delta", "partial_json": json.dumps(use["input"])})
            out += self._stop()
        if chunk.get("done"):
            out += self._stop()
            out += _event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": _stop_reason(chunk, self.called),
                                                      "stop_sequence": None},
                                            "usage": _usage(chunk)})
            out += _event("message_stop", {"type": "message_stop"})
        return out


async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = parse(body)
    node = _node(request)
    source = node.dispatcher.stream(req, "/v1/messages")
    mid = "msg_" + secrets.token_hex(12)
    if req.stream:
        events = _Events(mid, req.model, estimate_tokens(req))

        def on_error(e: OllamaDistributedError) -> bytes:
            return _event("error", error_body(e.status, e.message))

        return await stream_lines(request, source, events.render, SSE, on_error=on_error)
    got = await gather(source)
    content: list[dict[str, Any]] = []
    if got.thinking:
        content.append({"type": "thinking", "thinking": got.thinking, "signature": ""})
    if got.text or not got.tool_calls:
        content.append({"type": "text", "text": got.text})
    content.extend(_tool_use(c) for c in got.tool_calls)
    return web.json_response({"id": mid, "type": "message", "role": "assistant", "model": req.model,
                              "content": content, "stop_reason": _stop_reason(got.final, bool(got.tool_calls)),
                              "stop_sequence": None, "usage": _usage(got.final)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
