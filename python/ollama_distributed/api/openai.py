"""OpenAI's HTTP API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import base64
import json
import secrets
import struct
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engines.base import InferenceRequest
from ..engines.toolcalls import check_tool_messages, parse_tool_calls, validate_tool_choice, validate_tools
from ..errors import BadRequestError, ModelNotFoundError
from .common import (
    MAX_TOP_LOGPROBS,
    field,
    gather,
    images,
    normalise,
    read_json,
    refuse_images,
    stream_lines,
    top_logprobs,
)

if TYPE_CHECKING:
    from ..node import Node

SSE = "text/event-stream"


def _node(request: web.Request) -> Node:
    node: Node = request.app["node"]
    return node


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields as Ollama options."""
    opts: dict[str, Any] = {}
    for theirs, ours in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                         ("frequency_penalty", "frequency_penalty"),
                         ("presence_penalty", "presence_penalty")):
        value = field(body, theirs, (int, float))
        if value is not None:
            opts[ours] = value
    max_tokens = field(body, "max_completion_tokens", int) or field(body, "max_tokens", int)
    if max_tokens is not None:
        opts["num_predict"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequestError("stop must be a string or a list of strings")
        opts["stop"] = stop
    n = field(body, "n", int, 1)
    if n != 1:
        raise BadRequestError("n must be 1")
    return opts


def _format(body: dict[str, Any]) -> Any:
    rf = field(body, "response_format", dict)
    if not rf or rf.get("type") in (None, "text"):
        return None
    if rf.get("type") == "json_object":
        return "json"
    if rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequestError("response_format.json_schema.schema must be an object")
        return schema
    raise BadRequestError("response_format.type must be text, json_object or json_schema")


def _usage(final: dict[str, Any]) -> dict[str, Any]:
    # OpenAI's prompt_tokens is the whole prompt, the part served from a warm
    # prefix included and also given as cached_tokens (Ollama's prompt_eval_count
    # counts only what was evaluated)
    cached = int(final.get("prompt_cached_count") or 0)
    p = int(final.get("prompt_eval_count") or 0) + cached
    c = int(final.get("eval_count") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(final: dict[str, Any]) -> str:
    return "length" if final.get("done_reason") == "length" else "stop"


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI messages in Ollama's shape: tool calls with their arguments as
    objects, and a tool result named after the call it answers."""
    msgs = field(body, "messages", list, required=True)
    out: list[dict[str, Any]] = []
    names_by_id: dict[str, str] = {}
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequestError(f"messages[{i}] must be an object with a valid role")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: text; images are parsed, then refused
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise BadRequestError(f"messages[{i}].content[{j}].image_url.url is required")
                    if url.startswith("data:"):
                        images([url.split(",", 1)[-1]], f"messages[{i}].content[{j}].image_url")
                    refuse_images(str(body.get("model")))
                if kind != "text":
                    raise BadRequestError(f"messages[{i}].content[{j}]: only text and image_url content "
                                          "parts are supported")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequestError(f"messages[{i}].content must be a string")
        role = "system" if m["role"] == "developer" else m["role"]
        msg: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = parse_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
            for c in msg["tool_calls"]:
                if c.get("id"):
                    names_by_id[c["id"]] = c["function"]["name"]
        reasoning = m.get("reasoning") or m.get("reasoning_content")
        if role == "assistant" and isinstance(reasoning, str) and reasoning:
            msg["thinking"] = reasoning
        if role == "tool":
            tcid = m.get("tool_call_id")
            if tcid is not None and not isinstance(tcid, str):
                raise BadRequestError(f"messages[{i}].tool_call_id must be a string")
            if tcid:
                msg["tool_call_id"] = tcid
                if tcid in names_by_id:
                    msg["tool_name"] = names_by_id[tcid]
            if isinstance(m.get("name"), str) and m["name"]:
                msg["tool_name"] = m["name"]
        out.append(msg)
    check_tool_messages(out)
    return out


def _think(body: dict[str, Any]) -> Any:
    """reasoning_effort (or reasoning.effort) as Ollama's think, clamped to its levels as Ollama does."""
    reasoning = field(body, "reasoning", dict)
    effort = reasoning.get("effort") if reasoning else field(body, "reasoning_effort", str)
    if effort in (None, ""):
        return None
    mapping = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
               "max": "max", "xhigh": "max", "ultra": "max"}
    if not isinstance(effort, str) or effort not in mapping:
        raise BadRequestError(f'invalid reasoning value: "{effort}" (must be "minimal", "low", "medium", '
                              '"high", "xhigh", "ultra", "max", or "none")')
    return mapping[effort]


def _openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": c.get("id", ""), "index": c["function"].get("index", i), "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": json.dumps(c["function"].get("arguments") or {},
                                                  separators=(",", ":"), ensure_ascii=False)}}
            for i, c in enumerate(calls)]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = field(body, "model", str, required=True)
    stream = field(body, "stream", bool, False)
    logprobs = field(body, "logprobs", bool, False)
    tools = validate_tools(body.get("tools")) or None
    req = InferenceRequest(kind="chat", model=model, messages=_messages(body), options=_options(body),
                           format=_format(body), stream=stream, logprobs=logprobs,
                           top_logprobs=top_logprobs(body), tools=tools,
                           tool_choice=validate_tool_choice(body.get("tool_choice"), tools), think=_think(body))
    node = _node(request)
    source = node.dispatcher.stream(req, "/v1/chat/completions")
    cid = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_ollama_distributed"}
    if stream:
        include_usage = bool((field(body, "stream_options", dict) or {}).get("include_usage"))
        sent_role = False
        sent_calls = False

        def render(chunk: dict[str, Any]) -> bytes:
            nonlocal sent_role, sent_calls
            if chunk.get("done"):
                if chunk.get("done_reason") in ("load", "unload"):
                    return b""
                reason = "tool_calls" if sent_calls and _finish(chunk) == "stop" else _finish(chunk)
                out = _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
                if include_usage:
                    out += _sse({**base, "choices": [], "usage": _usage(chunk)})
                return out
            delta: dict[str, Any] = {}
            if not sent_role:
                delta["role"] = "assistant"
                sent_role = True
            if chunk.get("thinking"):
                delta["reasoning"] = chunk["thinking"]
            if chunk.get("tool_calls"):
                delta["tool_calls"] = _openai_calls(chunk["tool_calls"])
                sent_calls = True
            if "text" in chunk or not delta.keys() - {"role"}:
                delta["content"] = chunk.get("text", "")
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            if req.logprobs:
                choice["logprobs"] = _chat_logprobs(chunk.get("logprobs") or [])
            return _sse({**base, "choices": [choice]})

        return await stream_lines(request, source, render, SSE, trailer=b"data: [DONE]\n\n",
                                  on_error=lambda e: _sse({"error": {"message": e.message}}))
    got = await gather(source)
    message: dict[str, Any] = {"role": "assistant", "content": got.text}
    if got.thinking:
        message["reasoning"] = got.thinking
    finish = _finish(got.final)
    if got.tool_calls:
        message["tool_calls"] = _openai_calls(got.tool_calls)
        finish = "tool_calls" if finish == "stop" else finish
    return web.json_response({
        **base, "object": "chat.completion",
        "choices": [{"index": 0, "message": message,
                     "logprobs": _chat_logprobs(got.logprobs) if req.logprobs else None,
                     "finish_reason": finish}],
        "usage": _usage(got.final),
    })


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Chat completions' shape: every entry carries `top_logprobs` (maybe empty)."""
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes"),
                         "top_logprobs": e.get("top_logprobs") or []} for e in entries],
            "refusal": None}


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Legacy completions' shape: parallel lists, the alternatives as {token: logprob}."""
    tokens = [e["token"] for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e.get("top_logprobs") or []} for e in entries],
            "text_offset": offsets}


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = field(body, "model", str, required=True)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise BadRequestError("prompt must be a string (or a list of exactly one string)")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequestError("prompt must be a string")
    stream = field(body, "stream", bool, False)
    top = field(body, "logprobs", int)  # here an integer: how many alternatives per token
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequestError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    if body.get("echo"):
        raise BadRequestError("echo is not supported")
    req = InferenceRequest(kind="generate", model=model, prompt=prompt, raw=True,
                           options=_options(body), format=_format(body), stream=stream,
                           logprobs=top is not None, top_logprobs=top or 0,
                           suffix=field(body, "suffix", str, ""))
    node = _node(request)
    source = node.dispatcher.stream(req, "/v1/completions")
    base = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama_distributed"}
    if stream:
        include_usage = bool((field(body, "stream_options", dict) or {}).get("include_usage"))
        offset = 0

        def render(chunk: dict[str, Any]) -> bytes:
            nonlocal offset
            if chunk.get("done"):
                out = _sse({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                 "finish_reason": _finish(chunk)}]})
                if include_usage:
                    out += _sse({**base, "choices": [], "usage": _usage(chunk)})
                return out
            text = chunk.get("text", "")
            lp = _completion_logprobs(chunk.get("logprobs") or [], offset) if req.logprobs else None
            offset += len(text)
            return _sse({**base, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                              "finish_reason": None}]})

        return await stream_lines(request, source, render, SSE, trailer=b"data: [DONE]\n\n",
                                  on_error=lambda e: _sse({"error": {"message": e.message}}))
    got = await gather(source)
    return web.json_response({**base, "choices": [{"index": 0, "text": got.text,
                                                   "logprobs": _completion_logprobs(got.logprobs, 0)
                                                   if req.logprobs else None,
                                                   "finish_reason": _finish(got.final)}],
                              "usage": _usage(got.final)})


async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = field(body, "model", str, required=True)
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    else:
        raise BadRequestError("input must be a string or a non-empty list of strings")
    encoding = field(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise BadRequestError("encoding_format must be float or base64")
    dims = field(body, "dimensions", int)
    if dims is not None and dims < 1:
        raise BadRequestError("dimensions must be a positive integer")
    node = _node(request)
    result = await node.dispatcher.embed(
        InferenceRequest(kind="embed", model=model, input=inputs, dimensions=dims), "/v1/embeddings")
    data = [{"object": "embedding", "embedding": _encode(normalise(v[:dims]) if dims else v, encoding), "index": i}
            for i, v in enumerate(result["embeddings"])]
    tokens = int(result.get("prompt_eval_count") or 0)
    return web.json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _model_obj(entry: dict[str, Any]) -> dict[str, Any]:
    name = entry["name"]
    owner = name.split("/")[0] if "/" in name else "library"
    modified = entry.get("modified_at")
    created = int(time.time())
    if isinstance(modified, str):
        from datetime import datetime

        try:
            created = int(datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    node = _node(request)
    return web.json_response({"object": "list",
                              "data": [_model_obj(e) for e in await node.catalog_entries()]})


async def get_model(request: web.Request) -> web.Response:
    node = _node(request)
    wanted = request.match_info["model"]
    for entry in await node.catalog_entries():
        if entry["name"] == wanted or entry["name"] == f"{wanted}:latest":
            return web.json_response(_model_obj(entry))
    raise ModelNotFoundError(wanted)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/embeddings", embeddings)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model:.+}", get_model)
