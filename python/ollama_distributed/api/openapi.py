"""GET /api/openapi.json: an OpenAPI 3.1 description of every endpoint.

Every operation lists each status it can answer and, for each, the body as
sent: its Content-Type and schema (openapi_schemas.py). Errors come in the
shape of the API they belong to: Ollama's `{"error": "..."}`, OpenAI's under
/v1/, Anthropic's under /v1/messages. Streams: application/x-ndjson's schema
is that of each line (a chunk, or `{"error"}` when it fails part way);
text/event-stream's is that of each event, its data JSON but for OpenAI's
closing `[DONE]`. tests/integration/test_schemathesis.py holds the node to it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__
from . import openapi_schemas as s
from .openapi_schemas import Schema, obj

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

_REASONS = {
    400: "Bad request", 401: "No API key, or a wrong one (while keys are in force)",
    403: "An Origin or Host not allowed, a key whose role does not allow this, or (pull, push) a registry "
         "models.registries does not allow",
    404: "Unknown model or node", 409: "Conflicts with the cluster's state, or not running on this node",
    410: "Gone", 413: "Body larger than api.max_body_bytes",
    429: "The key's rate limit, or (inference) this tenant holds its share of the node's queue: see Retry-After",
    500: "The engine failed", 501: "Not available for this engine",
    502: "A peer or the registry unreachable, or it answered garbage", 503: "Busy or no quorum: see Retry-After",
    504: "A peer stopped sending", 507: "No space left"}
# Answered by the guard in front of every handler; `/` and /health* skip the key checks.
_GUARDED = (401, 403, 429)
_OPEN = (403,)
_INFERENCE = (400, 404, 500, 502, 503, 504)
_WRITES = (400, 404, 503)  # a change the cluster's log must commit: 503 without a quorum


def _body(props: dict[str, Any], required: list[str], example: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": obj(props, required)}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}}


def _sse(data: Schema, done: bool = False) -> Schema:
    """One server-sent event whose data is JSON matching `data` (or, with
    `done`, OpenAI's closing `[DONE]`)."""
    json_data: Schema = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    return obj({"event": s.STR, "data": {"anyOf": [json_data, {"const": "[DONE]"}]} if done else json_data},
               ["data"])


def _op(summary: str, body: dict[str, Any] | None = None, ok: Schema | None = None, *,
        status: int = 200, ok_text: str = "OK", media: str = "application/json",
        stream: tuple[str, Schema] | None = None, also: dict[int, tuple[str, Schema]] | None = None,
        errors: tuple[int, ...] = (), error: Schema = s.ERROR, guard: tuple[int, ...] = _GUARDED,
        head: bool = False) -> dict[str, Any]:
    """An operation: `ok` is the body of its success in `media` (None: no
    body), `stream` the media type and item schema of its streamed form,
    `also` other answers that are not errors, `errors` its own error statuses
    beside the guard's. A HEAD answers no body."""
    def answer(text: str, content: dict[str, Any]) -> dict[str, Any]:
        return {"description": text, "content": content} if content and not head else {"description": text}

    content: dict[str, Any] = {}
    if ok is not None:
        content[media] = {"schema": ok}
    if stream:
        kind, item = stream
        each = "Each line of the stream" if kind == NDJSON else "Each event of the stream"
        content[kind] = {"schema": {**item, "description": each}}
    op: dict[str, Any] = {"summary": summary, "responses": {str(status): answer(ok_text, content)}}
    for code, (text, schema) in (also or {}).items():
        op["responses"][str(code)] = answer(text, {"application/json": {"schema": schema}})
    for code in sorted(set(errors) | set(guard) | ({413} if body else set())):
        op["responses"][str(code)] = answer(_REASONS[code], {"application/json": {"schema": error}})
    if body:
        op["requestBody"] = body
    return op


def _ollama_stream(chunk: Schema) -> tuple[str, Schema]:
    return NDJSON, {"anyOf": [chunk, s.ERROR]}


def _openai(summary: str, body: dict[str, Any], ok: Schema, chunk: Schema | None = None) -> dict[str, Any]:
    stream = (SSE, _sse({"anyOf": [chunk, s.OA_STREAM_ERROR]}, done=True)) if chunk else None
    return _op(summary, body, ok, stream=stream, errors=_INFERENCE, error=s.OPENAI_ERROR)


MODEL = "smollm2:135m"  # the examples name the model a new node comes with


def _requests() -> dict[str, dict[str, Any]]:
    """The request bodies, by operation."""
    model = s.STR
    return {
        "generate": _body({
            "model": model, "prompt": s.STR, "system": s.STR, "template": s.STR, "stream": s.BOOL,
            "raw": {"type": "boolean", "description": "The prompt as is: no template, system or context"},
            "suffix": {"type": "string", "description": "Fill in the middle: text after the completion "
                       "(models with FIM tokens or a template using .Suffix)"},
            "format": s.FORMAT, "options": s.OPTIONS, "keep_alive": s.KEEP_ALIVE, "images": s.IMAGES,
            "think": s.THINK, "logprobs": s.LOGPROBS, "top_logprobs": s.TOP_LOGPROBS, "shift": s.SHIFT,
            "truncate": s.TRUNCATE, "context": s.array(s.INT)}, ["model"],
            {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False}),
        "chat": _body({
            "model": model, "messages": s.array(s.MESSAGE), "stream": s.BOOL, "format": s.FORMAT,
            "options": s.OPTIONS, "keep_alive": s.KEEP_ALIVE, "tools": s.TOOLS, "tool_choice": s.TOOL_CHOICE,
            "think": s.THINK, "reasoning_effort": {"type": "string", "description": "OpenAI: as think (none is false)"},
            "logprobs": s.LOGPROBS, "top_logprobs": s.TOP_LOGPROBS, "shift": s.SHIFT, "truncate": s.TRUNCATE},
            ["model"], {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}),
        "embed": _body({
            "model": model, "input": s.TEXTS, "truncate": s.BOOL,
            "dimensions": {"type": "integer", "minimum": 1,
                           "description": "Keep the first N values of each vector, normalised again"},
            "options": s.OPTIONS, "keep_alive": s.KEEP_ALIVE}, ["model", "input"],
            {"model": MODEL, "input": ["first", "second"]}),
        "embeddings": _body({"model": model, "prompt": s.STR}, ["model", "prompt"],
                            {"model": MODEL, "prompt": "Hello"}),
        "show": _body({"model": model}, ["model"], {"model": MODEL}),
        "create": _body({"model": model, "from": s.STR, "files": s.OBJ, "template": s.STR, "system": s.STR,
                         "parameters": s.OBJ, "license": s.STR, "stream": s.BOOL}, ["model"],
                        {"model": "mario", "from": MODEL, "system": "You are Mario from Super Mario Bros."}),
        "copy": _body({"source": s.STR, "destination": s.STR}, ["source", "destination"],
                      {"source": MODEL, "destination": "smollm2-backup"}),
        "delete": _body({"model": model}, ["model"], {"model": "smollm2-backup"}),
        "transfer": _body({"model": model, "insecure": s.BOOL, "stream": s.BOOL}, ["model"]),
        "oa_chat": _body({
            "model": model, "messages": s.array(s.OBJ), "stream": s.BOOL, "stream_options": s.OBJ,
            "temperature": s.NUM, "top_p": s.NUM, "seed": s.INT, "max_tokens": s.INT,
            "max_completion_tokens": s.INT, "stop": s.TEXTS, "response_format": s.OBJ, "tools": s.TOOLS,
            "tool_choice": s.TOOL_CHOICE, "logprobs": s.LOGPROBS, "top_logprobs": s.TOP_LOGPROBS},
            ["model", "messages"], {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}],
                                    "stream": True}),
        "oa_completion": _body({
            "model": model, "prompt": {"oneOf": [s.STR, {"type": "array", "items": s.STR, "maxItems": 1}]},
            "suffix": s.STR, "stream": s.BOOL, "max_tokens": s.INT, "temperature": s.NUM,
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                         "description": "Alternatives per token; set for token logprobs"}},
            ["model"], {"model": MODEL, "prompt": "Once upon a time"}),
        "oa_embeddings": _body({"model": model, "input": s.TEXTS,
                                "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                                "dimensions": {"type": "integer", "minimum": 1}}, ["model", "input"],
                               {"model": MODEL, "input": "Hello", "encoding_format": "base64"}),
        "messages": _body({
            "model": model, "max_tokens": {"type": "integer", "minimum": 1},
            "system": {"oneOf": [s.STR, s.array(s.OBJ)]},
            "messages": s.array(obj({
                "role": {"type": "string", "enum": ["user", "assistant"]},
                "content": {"oneOf": [s.STR, s.array(obj({"type": {"type": "string", "enum": [
                    "text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"]}}, ["type"]))]}},
                ["role", "content"])),
            "tools": s.array(obj({"name": s.STR, "description": s.STR, "input_schema": {"type": "object"}},
                                 ["name", "input_schema"])),
            "tool_choice": {"type": "object", "properties": {"type": {"type": "string", "enum": [
                "auto", "any", "tool", "none"]}, "name": s.STR}},
            "thinking": {"type": "object", "properties": {
                "type": {"type": "string", "enum": ["enabled", "disabled"]}, "budget_tokens": s.INT}},
            "stream": s.BOOL, "temperature": s.NUM, "top_p": s.NUM, "top_k": s.INT, "stop_sequences": s.STRS,
            "metadata": s.OBJ}, ["model", "max_tokens", "messages"],
            {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}], "stream": True}),
        "responses": _body({
            "model": model, "instructions": s.STR,
            "input": {"oneOf": [s.STR, s.array({"type": "object", "properties": {"type": {"type": "string", "enum": [
                "message", "function_call", "function_call_output", "reasoning"]}}})]},
            "tools": s.array(obj({"type": {"type": "string", "enum": ["function"]}, "name": s.STR,
                                  "description": s.STR, "parameters": {"type": "object"}}, ["type", "name"])),
            "tool_choice": s.TOOL_CHOICE, "stream": s.BOOL, "max_output_tokens": s.INT, "temperature": s.NUM,
            "top_p": s.NUM, "text": s.OBJ, "reasoning": {"type": "object", "properties": {"effort": s.STR}},
            "include": s.array({"type": "string", "enum": ["message.output_text.logprobs"]}),
            "top_logprobs": s.TOP_LOGPROBS,
            "previous_response_id": {"type": "null", "description": "Stateless: refused"}}, ["model", "input"],
            {"model": MODEL, "input": "Hello", "stream": True}),
        "rebalance": _body({"model": model, "dry_run": s.BOOL}, [], {"dry_run": True}),
        "migrate": _body({"model": model, "from": s.STR, "to": s.STR}, ["model", "from", "to"]),
        "placement": _body({"model": model, "replicas": {"type": ["integer", "null"], "minimum": 1, "maximum": 64},
                            "node_labels": {"type": "object", "additionalProperties": s.STR, "maxProperties": 32}},
                           ["model"]),
    }


def _node_id() -> list[dict[str, Any]]:
    return [{"name": "node_id", "in": "path", "required": True, "schema": s.STR}]


_PRIORITY = {"name": "X-Priority", "in": "header", "required": False,
             "description": "interactive (default, or the API key's) or batch: batch work waits while "
                            "interactive work queues, until scheduler.batch_promote_after_s",
             "schema": {"type": "string", "enum": ["interactive", "batch"]}}
_TENANT = {"name": "X-Tenant", "in": "header", "required": False,
           "description": "The tenant this request is served as; heeded only from api.trusted_proxies",
           "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"}}
_QUEUE_POSITION = {"X-Queue-Position": {
    "description": "The place the request had in the serving node's queue (0: it ran at once)",
    "schema": {"type": "integer", "minimum": 0}}}
_QUEUE_ROW = obj({"tenant": s.STR, "priority": {"type": "string", "enum": ["interactive", "batch"]},
                  "age_s": s.NUM, "tokens_estimated": s.INT, "slot": s.INT, "position": s.INT})
_QUEUE = obj({
    "node": s.STR, "num_parallel": s.INT, "max_queue": s.INT, "queue_depth": s.INT, "in_flight": s.INT,
    "tenant_queue_share": s.NUM, "batch_promote_after_s": s.NUM,
    "models": s.array(obj({"model": s.STR, "kind": {"type": "string", "enum": ["generate", "embed"]},
                           "running": s.array(_QUEUE_ROW), "queued": s.array(_QUEUE_ROW)})),
    "tenants": s.array(obj({"tenant": s.STR, "virtual_tokens": s.NUM, "queued": s.INT, "running": s.INT}))},
    ["node", "models", "tenants"])


def _inference(op: dict[str, Any]) -> dict[str, Any]:
    """An operation that goes through a node's fair queue: X-Priority and
    X-Tenant in, X-Queue-Position out (429 is among the guard's answers)."""
    op["parameters"] = [_PRIORITY, _TENANT]
    op["responses"]["200"]["headers"] = _QUEUE_POSITION
    return op


def spec() -> dict[str, Any]:
    b = _requests()
    progress = _ollama_stream(s.PROGRESS)
    blob = [{"name": "digest", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^sha256[:-][0-9a-f]{64}$"}}]
    paths: dict[str, Any] = {
        "/": {"get": _op("Liveness text", ok={"type": "string", "const": "Ollama is running"}, media="text/plain",
                         guard=_OPEN),
              "head": _op("Liveness", guard=_OPEN, head=True)},
        "/api/generate": {"post": _op("Generate a completion", b["generate"], s.GENERATE,
                                      stream=_ollama_stream(s.GENERATE), errors=_INFERENCE)},
        "/api/chat": {"post": _op("Chat", b["chat"], s.CHAT, stream=_ollama_stream(s.CHAT), errors=_INFERENCE)},
        "/api/embed": {"post": _op("Embeddings (normalised)", b["embed"], s.EMBED, errors=_INFERENCE)},
        "/api/embeddings": {"post": _op("Legacy embedding of one prompt", b["embeddings"], s.EMBEDDING,
                                        errors=_INFERENCE)},
        "/api/show": {"post": _op("Model details", b["show"], s.SHOW, errors=(400, 404, 501))},
        "/api/create": {"post": _op("Create a model from blobs or another model", b["create"], s.PROGRESS,
                                    stream=progress, errors=(*_WRITES, 507))},
        "/api/copy": {"post": _op("Copy a model", b["copy"], errors=_WRITES)},
        "/api/delete": {"delete": _op("Delete a model", b["delete"], errors=_WRITES)},
        "/api/pull": {"post": _op("Pull from the registry the name's host part names", b["transfer"], s.PROGRESS,
                                  stream=progress, errors=(*_WRITES, 501, 502, 507))},
        "/api/push": {"post": _op("Push to the registry the name's host part names", b["transfer"], s.PROGRESS,
                                  stream=progress, errors=(400, 404, 501, 502))},
        "/api/tags": {"get": _op("Models available", ok=s.TAGS)},
        "/api/ps": {"get": _op("Models loaded, each with its context_length and expires_at", ok=s.PS)},
        "/api/version": {"get": _op("Server version", ok=s.VERSION), "head": _op("Server is up", head=True)},
        "/api/blobs/{digest}": {
            "parameters": blob,
            "head": _op("Whether the blob exists (404: it does not)", errors=(400, 404), head=True),
            "post": _op("Upload a blob; its sha256 is verified", {
                "required": True, "content": {"application/octet-stream": {"schema": {
                    "type": "string", "format": "binary"}}}}, status=201, ok_text="Created",
                errors=(400, 507))},
        "/v1/chat/completions": {"post": _openai("OpenAI chat completions", b["oa_chat"], s.CHAT_COMPLETION,
                                                 s.CHAT_COMPLETION_CHUNK)},
        "/v1/completions": {"post": _openai("OpenAI completions", b["oa_completion"], s.COMPLETION,
                                            s.COMPLETION_CHUNK)},
        "/v1/embeddings": {"post": _openai("OpenAI embeddings", b["oa_embeddings"], s.OA_EMBEDDINGS)},
        "/v1/messages": {"post": _op(
            "Anthropic Messages: text, tool_use and tool_result blocks, thinking; x-api-key is accepted as the key",
            b["messages"], s.MESSAGE_ANSWER, stream=(SSE, _sse(s.TYPED_EVENT)), errors=_INFERENCE,
            error=s.ANTHROPIC_ERROR)},
        "/v1/responses": {"post": _op("OpenAI Responses, stateless: the whole conversation as input",
                                      b["responses"], s.RESPONSE, stream=(SSE, _sse(s.TYPED_EVENT)),
                                      errors=_INFERENCE, error=s.OPENAI_ERROR)},
        "/v1/models": {"get": _op("OpenAI model list", ok=s.OA_MODELS, error=s.OPENAI_ERROR)},
        "/v1/models/{model}": {"parameters": [{"name": "model", "in": "path", "required": True, "schema": s.STR,
                                               "example": MODEL}],
                               "get": _op("One model", ok=s.OA_MODEL, errors=(404,), error=s.OPENAI_ERROR)},
        "/health": {"get": _op("Node health with service flags", ok=s.HEALTH, ok_text="Healthy or degraded",
                               also={503: ("Unhealthy: a task has died", s.HEALTH)}, guard=_OPEN)},
        "/health/live": {"get": _op("Liveness", ok=s.LIVE, guard=_OPEN)},
        "/health/ready": {"get": _op("Readiness: 503 until started and while draining", ok=s.READY,
                                     ok_text="Ready", also={503: ("Starting or draining", s.READY)}, guard=_OPEN)},
        "/api/distributed/status": {"get": _op("Cluster status", ok=s.CLUSTER_STATUS)},
        "/api/distributed/nodes": {"get": _op("Cluster nodes with resources", ok=s.NODES)},
        "/api/distributed/nodes/{node_id}": {
            "parameters": _node_id(),
            "delete": _op("Remove a node that is down for good from the cluster's membership", ok=s.NODE_REMOVED,
                          errors=(404, 409, 503))},
        "/api/distributed/nodes/{node_id}/drain": {
            "parameters": _node_id(),
            "post": _op("Drain a node (id or name, this one or a peer) without stopping it: readiness 503, peers "
                        "route elsewhere, queued requests move, running ones get node.drain_timeout_s, then "
                        "migrate", ok=s.NODE_DRAIN, status=202, ok_text="Accepted", errors=(404, 409, 502, 503))},
        "/api/distributed/nodes/{node_id}/undrain": {
            "parameters": _node_id(),
            "post": _op("End a node's drain: it takes requests again", ok=s.NODE_DRAIN,
                        errors=(404, 409, 502, 503))},
        "/api/distributed/metrics": {"get": _op("Cluster metrics summary", ok=s.CLUSTER_METRICS)},
        "/api/distributed/queue": {"get": _op(
            "This node's requests per model, running and queued (tenant, priority, position, age), and each "
            "tenant's virtual token counter", ok=_QUEUE)},
        "/api/distributed/token": {"get": _op(
            "Gone: the join token is never served over HTTP; `cluster token` on the node reads it", ok=s.ERROR,
            status=410, ok_text="Always")},
        "/api/distributed/models": {"get": _op("Models and the nodes holding them", ok=s.CLUSTER_MODELS)},
        "/api/distributed/replication/status": {"get": _op(
            "Peer-to-peer model replication: blob transfers in progress (direction, peer, digest, offset, "
            "bytes, total, bytes_per_sec), models being replicated, totals, tombstones", ok=s.REPLICATION,
            errors=(409,))},
        "/api/distributed/rebalance": {"post": _op(
            "Place every model (or one) anew, spread by bytes over the nodes that can hold it; returns "
            "the moves", b["rebalance"], s.REBALANCE, errors=(*_WRITES, 409))},
        "/api/distributed/migrate": {"post": _op(
            "Move a model's copy from one node to another (202: committed; the copy then moves)",
            b["migrate"], s.MIGRATE, status=202, ok_text="Accepted", errors=(*_WRITES, 409))},
        "/api/distributed/placement": {"post": _op(
            "A model's placement policy: replicas and the node labels it needs", b["placement"], s.PLACEMENT,
            errors=(*_WRITES, 409))},
        "/metrics": {"get": _op("Prometheus metrics", ok=s.STR, ok_text="Prometheus text format",
                                media="text/plain")},
        "/api/openapi.json": {"get": _op("This document", ok=s.OPENAPI)},
    }
    for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions",
                 "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/responses"):
        _inference(paths[path]["post"])
    return {
        "openapi": "3.1.0",
        "info": {"title": "ollama-distributed", "version": __version__,
                 "description": "Ollama- and OpenAI-compatible API of an ollama-distributed node."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


async def handler(request: web.Request) -> web.Response:
    return web.json_response(spec())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", handler)
