"""OpenAI's Responses API (`POST /v1/responses`), stateless as Ollama serves
it: `input` (a string or message / function_call / function_call_output /
reasoning items), `instructions`, function `tools`, `tool_choice`, `text.format`,
`reasoning.effort`, and the stream events by OpenAI's names (response.created …
response.output_text.delta … response.completed). Nothing is stored: a
`previous_response_id` is refused, the whole conversation comes as `input`."""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engines.base import InferenceRequest
from ..errors import BadRequestError, OllamaDistributedError
from .common import field, gather, images, read_json, refuse_images, stream_lines, top_logprobs
from .messages import function_tools

if TYPE_CHECKING:
    from ..node import Node

SSE = "text/event-stream"
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for them


def _node(request: web.Request) -> Node:
    node: Node = request.app["node"]
    return node


# ---- request ------------------------------------------------------------------------


def _content(value: Any, where: str, model: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequestError(f"{where} must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise BadRequestError(f"{at}.text is required")
            texts.append(part["text"])
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) and not part.get("file_id"):
                raise BadRequestError(f"{at}.image_url is required")
            if isinstance(url, str) and url.startswith("data:"):
                images([url.split(",", 1)[-1]], f"{at}.image_url")
            refuse_images(model)
        elif kind == "input_file":
            raise BadRequestError(f"{at}: file inputs are not supported")
        else:
            raise BadRequestError(f"{at}.type: unknown content part type {kind!r}; expected one of "
                                  f"{', '.join(TEXT_PARTS)}, input_image")
    return "".join(texts)


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise BadRequestError(f"{where} must be a JSON string")
    try:
        args = json.loads(value) if value.strip() else {}
    except ValueError as e:
        raise BadRequestError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise BadRequestError(f"{where} must be a JSON object")
    return args


def _messages(body: dict[str, Any], model: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = field(body, "instructions", str)
    if instructions:
        out.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if raw is None:
        raise BadRequestError("input is required")
    if isinstance(raw, str):
        out.append({"role": "user", "content": raw})
        return out
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("input must be a string or a non-empty list of items")
    calls: set[str] = set()
    thinking = ""
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequestError(f"{where} must be an object")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise BadRequestError(f"{where}.role must be one of {', '.join(ROLES)}")
            msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                   "content": _content(item.get("content", ""), f"{where}.content", model)}
            if thinking and role == "assistant":
                msg["thinking"], thinking = thinking, ""
            out.append(msg)
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not call_id:
                raise BadRequestError(f"{where}.call_id is required")
            if not isinstance(name, str) or not name:
                raise BadRequestError(f"{where}.name is required")
            call: dict[str, Any] = {"id": call_id, "function": {"name": name,
                                                "arguments": _arguments(item.get("arguments", ""),
                                                                        f"{where}.arguments")}}
            calls.add(call_id)
            prev = out[-1] if out else None
            if prev is not None and prev["role"] == "assistant" and "tool_calls" in prev:
                call["function"]["index"] = len(prev["tool_calls"])
                prev["tool_calls"].append(call)
            else:
                call["function"]["index"] = 0
                turn: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [call]}
                if thinking:
                    turn["thinking"], thinking = thinking, ""
                out.append(turn)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise BadRequestError(f"{where}.call_id is required")
            if call_id not in calls:
                raise BadRequestError(f"{where}.call_id {call_id!r} matches no earlier function_call")
            output = item.get("output", "")
            out.append({"role": "tool", "content": _content(output, f"{where}.output", model),
                        "tool_call_id": call_id})
        elif kind == "reasoning":
            summary = item.get("summary") or []
            if not isinstance(summary, list):
                raise BadRequestError(f"{where}.summary must be a list")
            thinking += "".join(s.get("text", "") for s in summary if isinstance(s, dict))
        else:
            raise BadRequestError(f"{where}.type: unknown input item type {kind!r}; expected message, "
                                  "function_call, function_call_output or reasoning")
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    def read(t: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
        if t.get("type") != "function":
            raise BadRequestError(f"{where}.type {t.get('type')!r} is not supported: only function tools")
        params = t.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise BadRequestError(f"{where}.parameters must be a JSON Schema object")
        return t.get("name"), t.get("description"), params

    return function_tools(body, read)


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> Any:
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools or []}:
            raise BadRequestError("tool_choice.name must name one of the tools")
        return {"type": "function", "function": {"name": name}}
    raise BadRequestError('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}')


def _format(body: dict[str, Any]) -> Any:
    text = field(body, "text", dict) or {}
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return "json"
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequestError("text.format.schema must be a JSON Schema object")
        return fmt["schema"]
    raise BadRequestError("text.format.type must be text, json_object or json_schema")


def _think(body: dict[str, Any]) -> Any:
    reasoning = field(body, "reasoning", dict)
    if not reasoning or reasoning.get("effort") is None:
        return None
    effort = reasoning["effort"]
    if effort == "none":
        return False
    if effort in ("minimal", "low"):
        return "low"
    if effort in ("medium", "high"):
        return effort
    raise BadRequestError("reasoning.effort must be one of none, minimal, low, medium, high")


def _options(body: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("temperature", "top_p"):
        value = field(body, key, (int, float))
        if value is not None:
            opts[key] = value
    max_tokens = field(body, "max_output_tokens", int)
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequestError("max_output_tokens must be at least 1")
        opts["num_predict"] = max_tokens
    return opts


def parse(body: dict[str, Any]) -> InferenceRequest:
    model = field(body, "model", str, required=True)
    if body.get("previous_response_id") is not None:
        raise BadRequestError("previous_response_id is not supported: this server keeps no responses; "
                              "send the whole conversation as input")
    if body.get("background"):
        raise BadRequestError("background is not supported")
    include = field(body, "include", list) or []
    tools = _tools(body)
    return InferenceRequest(kind="chat", model=model, messages=_messages(body, model), options=_options(body),
                            format=_format(body), tools=tools, tool_choice=_tool_choice(body, tools),
                            think=_think(body), stream=field(body, "stream", bool, False),
                            logprobs=LOGPROBS in include, top_logprobs=top_logprobs(body))


# ---- response -----------------------------------------------------------------------


def _logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes") or [],
             "top_logprobs": [{"token": a["token"], "logprob": a["logprob"], "bytes": a.get("bytes") or []}
                              for a in e.get("top_logprobs") or []]} for e in entries]


def _usage(final: dict[str, Any]) -> dict[str, Any]:
    cached = int(final.get("prompt_cached_count") or 0)  # a warm prefix: counted in input_tokens too
    p, c = int(final.get("prompt_eval_count") or 0) + cached, int(final.get("eval_count") or 0)
    return {"input_tokens": p, "output_tokens": c, "total_tokens": p + c,
            "input_tokens_details": {"cached_tokens": cached}, "output_tokens_details": {"reasoning_tokens": 0}}


class _Response:
    """The response object and its output items, built as chunks arrive."""

    def __init__(self, body: dict[str, Any], req: InferenceRequest) -> None:
        self.id = "resp_" + secrets.token_hex(12)
        self.body, self.req = body, req
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.seq = 0
        self.reasoning: dict[str, Any] | None = None
        self.message: dict[str, Any] | None = None
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    def obj(self, status: str, final: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        incomplete = final is not None and final.get("done_reason") == "length"
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "completed_at": int(time.time()) if status != "in_progress" else None,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "model": self.req.model, "previous_response_id": None, "instructions": b.get("instructions"),
            "output": self.output if status != "in_progress" else [], "error": None,
            "tools": b.get("tools") or [], "tool_choice": b.get("tool_choice") or "auto",
            "truncation": "disabled", "parallel_tool_calls": True,
            "text": {"format": (b.get("text") or {}).get("format") or {"type": "text"}},
            "top_p": b.get("top_p", 1.0), "temperature": b.get("temperature", 1.0),
            "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": self.req.top_logprobs,
            "reasoning": b.get("reasoning") or {"effort": None, "summary": None},
            "usage": _usage(final) if final is not None else None,
            "max_output_tokens": b.get("max_output_tokens"), "max_tool_calls": None, "store": False,
            "background": False, "service_tier": "default", "metadata": b.get("metadata") or {},
        }

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    def _part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self.text), "annotations": [],
                "logprobs": _logprobs(self.logprobs)}

    def _close_reasoning(self) -> bytes:
        item = self.reasoning
        if item is None:
            return b""
        self.reasoning = None
        index = self.output.index(item)
        text = item["summary"][0]["text"]
        return (self._event("response.reasoning_summary_text.done", {"item_id": item["id"], "output_index": index,
                                                                      "summary_index": 0, "text": text})
                + self._event("response.output_item.done", {"output_index": index, "item": item}))

    def _close_message(self) -> bytes:
        item = self.message
        if item is None:
            return b""
        self.message = None
        index = self.output.index(item)
        part = self._part()
        item.update(status="completed", content=[part])
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return (self._event("response.output_text.done", {**ids, "text": part["text"],
                                                          "logprobs": part["logprobs"]})
                + self._event("response.content_part.done", {**ids, "part": part})
                + self._event("response.output_item.done", {"output_index": index, "item": item}))

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """Apply one engine chunk; the stream events it makes."""
        out = b""
        if chunk.get("thinking"):
            if self.reasoning is None:
                self.reasoning = {"id": "rs_" + secrets.token_hex(12), "type": "reasoning",
                                  "summary": [{"type": "summary_text", "text": ""}]}
                self.output.append(self.reasoning)
                out += self._event("response.output_item.added", {"output_index": len(self.output) - 1,
                                                                  "item": {**self.reasoning, "summary": []}})
            self.reasoning["summary"][0]["text"] += chunk["thinking"]
            out += self._event("response.reasoning_summary_text.delta", {
                "item_id": self.reasoning["id"], "output_index": self.output.index(self.reasoning),
                "summary_index": 0, "delta": chunk["thinking"]})
        if chunk.get("text"):
            out += self._close_reasoning()
            if self.message is None:
                self.message = {"id": "msg_" + secrets.token_hex(12), "type": "message", "status": "in_progress",
                                "role": "assistant", "content": []}
                self.output.append(self.message)
                index = len(self.output) - 1
                out += self._event("response.output_item.added", {"output_index": index, "item": self.message})
                out += self._event("response.content_part.added", {
                    "item_id": self.message["id"], "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
            self.text.append(chunk["text"])
            lp = chunk.get("logprobs") or []
            self.logprobs.extend(lp)
            out += self._event("response.output_text.delta", {
                "item_id": self.message["id"], "output_index": self.output.index(self.message),
                "content_index": 0, "delta": chunk["text"], "logprobs": _logprobs(lp)})
        for call in chunk.get("tool_calls") or []:
            out += self._close_reasoning() + self._close_message()
            fn = call.get("function", {})
            args = json.dumps(fn.get("arguments") or {})
            item = {"id": "fc_" + secrets.token_hex(12), "type": "function_call", "status": "completed",
                    "call_id": call.get("id") or "call_" + secrets.token_hex(12), "name": fn.get("name", ""),
                    "arguments": args}
            self.output.append(item)
            index = len(self.output) - 1
            ids = {"item_id": item["id"], "output_index": index}
            out += (self._event("response.output_item.added", {"output_index": index,
                                                               "item": {**item, "status": "in_progress",
                                                                        "arguments": ""}})
                    + self._event("response.function_call_arguments.delta", {**ids, "delta": args})
                    + self._event("response.function_call_arguments.done", {**ids, "arguments": args})
                    + self._event("response.output_item.done", {"output_index": index, "item": item}))
        if chunk.get("done"):
            out += self._close_reasoning() + self._close_message()
            final = self.obj("completed", chunk)
            out += self._event("response.completed" if final["status"] == "completed" else "response.incomplete",
                               {"response": final})
        return out

    def start(self) -> bytes:
        return (self._event("response.created", {"response": self.obj("in_progress")})
                + self._event("response.in_progress", {"response": self.obj("in_progress")}))


async def create(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = parse(body)
    node = _node(request)
    source = node.dispatcher.stream(req, "/v1/responses")
    resp = _Response(body, req)
    if req.stream:
        started = False

        def render(chunk: dict[str, Any]) -> bytes:
            nonlocal started
            out = b"" if started else resp.start()
            started = True
            return out + resp.feed(chunk)

        def on_error(e: OllamaDistributedError) -> bytes:
            failed = resp.obj("failed")
            failed["error"] = {"code": "server_error", "message": e.message}
            return resp._event("response.failed", {"response": failed})

        return await stream_lines(request, source, render, SSE, on_error=on_error)
    got = await gather(source)
    for chunk in ({"thinking": got.thinking}, {"text": got.text, "logprobs": got.logprobs},
                  {"tool_calls": got.tool_calls}, {**got.final, "done": True}):
        resp.feed(chunk)
    return web.json_response(resp.obj("completed", got.final))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
