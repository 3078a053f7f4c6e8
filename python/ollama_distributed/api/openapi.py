"""GET /api/openapi.json: an OpenAPI 3.1 description of every endpoint."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__

_ERR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_OPTIONS = {"type": "object", "description": "Ollama options: temperature, top_p, top_k, min_p, "
            "repeat_penalty, seed, num_predict, stop, num_ctx, ...", "additionalProperties": True}
_KEEP_ALIVE = {"oneOf": [{"type": "string"}, {"type": "number"}],
               "description": "How long the model stays loaded: '5m', 0 unloads, -1 keeps it"}
_FORMAT = {"oneOf": [{"type": "string", "enum": ["json"]}, {"type": "object"}]}
_TOOL_CALL = {"type": "object", "properties": {
    "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "properties": {
        "index": {"type": "integer"}, "name": {"type": "string"},
        "arguments": {"oneOf": [{"type": "object"}, {"type": "string"}],
                      "description": "an object (Ollama) or its JSON text (OpenAI)"}},
        "required": ["name"]}}, "required": ["function"]}
_MESSAGE = {"type": "object", "properties": {"role": {"type": "string",
            "enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string"},
            "images": {"type": "array", "items": {"type": "string"}}, "thinking": {"type": "string"},
            "tool_calls": {"type": "array", "items": _TOOL_CALL},
            "tool_name": {"type": "string", "description": "role tool: the function whose result this is"},
            "tool_call_id": {"type": "string", "description": "role tool: the call it answers (must match one)"}},
            "required": ["role"]}
_TOOLS = {"type": "array", "description": "Functions the model may call; parameters is a JSON Schema object",
          "items": {"type": "object", "properties": {
              "type": {"type": "string", "enum": ["function"]},
              "function": {"type": "object", "properties": {
                  "name": {"type": "string"}, "description": {"type": "string"},
                  "parameters": {"type": "object"}}, "required": ["name"]}},
              "required": ["function"]}}
_TOOL_CHOICE = {"oneOf": [{"type": "string", "enum": ["auto", "none", "required"]},
                          {"type": "object", "properties": {"type": {"type": "string", "enum": ["function"]},
                           "function": {"type": "object", "properties": {"name": {"type": "string"}},
                                        "required": ["name"]}}}],
                "description": "required or a named function constrains decoding to one valid call "
                               "(on /api/chat an extension: Ollama has none)"}
_THINK = {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["low", "medium", "high", "max"]}],
          "description": "Thinking models: the thinking comes apart in message.thinking (thinking on "
                         "/api/generate); 400 for a model without a thinking template"}
_OBJ = {"type": "object", "additionalProperties": True}
_IMAGES = {"type": "array", "items": {"type": "string", "contentEncoding": "base64"},
           "description": "Parsed and checked; refused, as no served model has vision"}
_LOGPROBS = {"type": "boolean", "description": "Return each token's log probability (from the logits)"}
_TOP_LOGPROBS = {"type": "integer", "minimum": 0, "maximum": 20,
                 "description": "How many likeliest alternatives to return per token"}
_TRUNCATE = {"type": "boolean", "description": "Keep the end of an input longer than the context "
             "(default); false: a 400 instead"}
_SHIFT = {"type": "boolean", "description": "Shift the context window when it is full instead of stopping"}


def _body(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": props, "required": required}}}}


def _accepted(op: dict[str, Any]) -> dict[str, Any]:
    """An operation that answers 202 instead of 200."""
    op["responses"] = {("202" if k == "200" else k): v for k, v in op["responses"].items()}
    return op


def _op(summary: str, body: dict[str, Any] | None = None, ok: str = "OK",
        stream: str | None = None, errors: tuple[int, ...] = (400, 404, 503)) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _OBJ}}
    if stream:
        content[stream] = {"schema": {"type": "string"}}
    op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": ok, "content": content}}}
    for code in errors:
        op["responses"][str(code)] = {"description": {400: "Bad request", 401: "Unauthorized",
                                      404: "Unknown model",
                                      409: "Conflicts with the cluster's state, or not running on this node",
                                      413: "Body too large",
                                      429: "This tenant holds its share of the node's queue: see Retry-After",
                                      501: "Not available", 502: "Registry unreachable or answered garbage",
                                      503: "Busy: see Retry-After", 507: "No space left"}[code],
                                      "content": {"application/json": {"schema": _ERR}}}
    if body:
        op["requestBody"] = body
    return op


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


def _inference(op: dict[str, Any]) -> dict[str, Any]:
    """An operation that goes through a node's fair queue: X-Priority and
    X-Tenant in, X-Queue-Position and 429 out."""
    op["parameters"] = [_PRIORITY, _TENANT]
    op["responses"]["200"]["headers"] = _QUEUE_POSITION
    op["responses"]["429"] = {"description": "This tenant holds its share of the node's queue: see Retry-After",
                              "content": {"application/json": {"schema": _ERR}}}
    return op


_QUEUE_ROW = {"type": "object", "properties": {
    "tenant": {"type": "string"}, "priority": {"type": "string", "enum": ["interactive", "batch"]},
    "age_s": {"type": "number"}, "tokens_estimated": {"type": "integer"},
    "slot": {"type": "integer"}, "position": {"type": "integer"}}}
_QUEUE = {"type": "object", "required": ["node", "models", "tenants"], "properties": {
    "node": {"type": "string"}, "num_parallel": {"type": "integer"}, "max_queue": {"type": "integer"},
    "queue_depth": {"type": "integer"}, "in_flight": {"type": "integer"},
    "tenant_queue_share": {"type": "number"}, "batch_promote_after_s": {"type": "number"},
    "models": {"type": "array", "items": {"type": "object", "properties": {
        "model": {"type": "string"}, "kind": {"type": "string", "enum": ["generate", "embed"]},
        "running": {"type": "array", "items": _QUEUE_ROW}, "queued": {"type": "array", "items": _QUEUE_ROW}}}},
    "tenants": {"type": "array", "items": {"type": "object", "properties": {
        "tenant": {"type": "string"}, "virtual_tokens": {"type": "number"},
        "queued": {"type": "integer"}, "running": {"type": "integer"}}}}}}


def spec() -> dict[str, Any]:
    gen = _body({"model": {"type": "string"}, "prompt": {"type": "string"}, "system": {"type": "string"},
                 "template": {"type": "string"}, "stream": {"type": "boolean"},
                 "raw": {"type": "boolean", "description": "The prompt as is: no template, system or context"},
                 "suffix": {"type": "string", "description": "Fill in the middle: text after the completion "
                            "(models with FIM tokens or a template using .Suffix)"},
                 "format": _FORMAT, "options": _OPTIONS, "keep_alive": _KEEP_ALIVE, "images": _IMAGES,
                 "think": _THINK, "logprobs": _LOGPROBS, "top_logprobs": _TOP_LOGPROBS, "shift": _SHIFT,
                 "truncate": _TRUNCATE, "context": {"type": "array", "items": {"type": "integer"}}}, ["model"])
    chat = _body({"model": {"type": "string"}, "messages": {"type": "array", "items": _MESSAGE},
                  "stream": {"type": "boolean"}, "format": _FORMAT, "options": _OPTIONS,
                  "keep_alive": _KEEP_ALIVE, "tools": _TOOLS, "tool_choice": _TOOL_CHOICE, "think": _THINK,
                  "reasoning_effort": {"type": "string", "description": "OpenAI: as think (none is false)"},
                  "logprobs": _LOGPROBS,
                  "top_logprobs": _TOP_LOGPROBS, "shift": _SHIFT, "truncate": _TRUNCATE}, ["model"])
    oa_chat = _body({"model": {"type": "string"}, "messages": {"type": "array", "items": _OBJ},
                     "stream": {"type": "boolean"}, "stream_options": _OBJ, "temperature": {"type": "number"},
                     "top_p": {"type": "number"}, "seed": {"type": "integer"}, "max_tokens": {"type": "integer"},
                     "max_completion_tokens": {"type": "integer"}, "stop": {"oneOf": [{"type": "string"},
                     {"type": "array", "items": {"type": "string"}}]}, "response_format": _OBJ,
                     "tools": _TOOLS, "tool_choice": _TOOL_CHOICE, "logprobs": _LOGPROBS,
                     "top_logprobs": _TOP_LOGPROBS}, ["model", "messages"])
    oa_completion = _body({"model": {"type": "string"}, "prompt": {"oneOf": [{"type": "string"}, {
                           "type": "array", "items": {"type": "string"}, "maxItems": 1}]},
                           "suffix": {"type": "string"}, "stream": {"type": "boolean"},
                           "max_tokens": {"type": "integer"}, "temperature": {"type": "number"},
                           "logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                                        "description": "Alternatives per token; set for token logprobs"}},
                          ["model"])
    messages = _body({
        "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
        "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": _OBJ}]},
        "messages": {"type": "array", "items": {"type": "object", "properties": {
            "role": {"type": "string", "enum": ["user", "assistant"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {
                "type": {"type": "string", "enum": ["text", "image", "tool_use", "tool_result", "thinking",
                                                    "redacted_thinking"]}}, "required": ["type"]}}]}},
            "required": ["role", "content"]}},
        "tools": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "input_schema": {"type": "object"}},
            "required": ["name", "input_schema"]}},
        "tool_choice": {"type": "object", "properties": {"type": {"type": "string",
                        "enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"}}},
        "thinking": {"type": "object", "properties": {"type": {"type": "string", "enum": ["enabled", "disabled"]},
                                                     "budget_tokens": {"type": "integer"}}},
        "stream": {"type": "boolean"}, "temperature": {"type": "number"}, "top_p": {"type": "number"},
        "top_k": {"type": "integer"}, "stop_sequences": {"type": "array", "items": {"type": "string"}},
        "metadata": _OBJ}, ["model", "max_tokens", "messages"])
    responses = _body({
        "model": {"type": "string"}, "instructions": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["message", "function_call", "function_call_output",
                                                "reasoning"]}}}}]},
        "tools": {"type": "array", "items": {"type": "object", "properties": {
            "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"},
            "description": {"type": "string"}, "parameters": {"type": "object"}}, "required": ["type", "name"]}},
        "tool_choice": _TOOL_CHOICE, "stream": {"type": "boolean"}, "max_output_tokens": {"type": "integer"},
        "temperature": {"type": "number"}, "top_p": {"type": "number"}, "text": _OBJ,
        "reasoning": {"type": "object", "properties": {"effort": {"type": "string"}}},
        "include": {"type": "array", "items": {"type": "string", "enum": ["message.output_text.logprobs"]}},
        "top_logprobs": _TOP_LOGPROBS,
        "previous_response_id": {"type": "null", "description": "Stateless: refused"}}, ["model", "input"])
    model_only = _body({"model": {"type": "string"}}, ["model"])
    transfer = _body({"model": {"type": "string"}, "insecure": {"type": "boolean"},
                      "stream": {"type": "boolean"}}, ["model"])
    paths: dict[str, Any] = {
        "/": {"get": _op("Liveness text: 'Ollama is running'", errors=()),
              "head": _op("Liveness", errors=())},
        "/api/generate": {"post": _op("Generate a completion", gen, stream="application/x-ndjson")},
        "/api/chat": {"post": _op("Chat", chat, stream="application/x-ndjson")},
        "/api/embed": {"post": _op("Embeddings (normalised)", _body(
            {"model": {"type": "string"}, "input": {"oneOf": [{"type": "string"},
             {"type": "array", "items": {"type": "string"}}]}, "truncate": {"type": "boolean"},
             "dimensions": {"type": "integer", "minimum": 1,
                            "description": "Keep the first N values of each vector, normalised again"},
             "options": _OPTIONS, "keep_alive": _KEEP_ALIVE}, ["model", "input"]))},
        "/api/embeddings": {"post": _op("Legacy embedding of one prompt", _body(
            {"model": {"type": "string"}, "prompt": {"type": "string"}}, ["model", "prompt"]))},
        "/api/show": {"post": _op("Model details", model_only, errors=(400, 404))},
        "/api/create": {"post": _op("Create a model from blobs or another model", _body(
            {"model": {"type": "string"}, "from": {"type": "string"}, "files": _OBJ,
             "template": {"type": "string"}, "system": {"type": "string"}, "parameters": _OBJ,
             "license": {"type": "string"}, "stream": {"type": "boolean"}}, ["model"]),
            stream="application/x-ndjson", errors=(400, 404))},
        "/api/copy": {"post": _op("Copy a model", _body({"source": {"type": "string"},
                      "destination": {"type": "string"}}, ["source", "destination"]), errors=(400, 404))},
        "/api/delete": {"delete": _op("Delete a model", model_only, errors=(400, 404))},
        "/api/pull": {"post": _op("Pull from the registry the name's host part names", transfer,
                                  stream="application/x-ndjson", errors=(400, 404, 502, 507))},
        "/api/push": {"post": _op("Push to the registry the name's host part names", transfer,
                                  stream="application/x-ndjson", errors=(400, 404, 502))},
        "/api/tags": {"get": _op("Models available", errors=())},
        "/api/ps": {"get": _op("Models loaded, each with its context_length and expires_at", errors=())},
        "/api/version": {"get": _op("Server version", errors=()), "head": _op("Server is up", errors=())},
        "/api/blobs/{digest}": {
            "parameters": [{"name": "digest", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^sha256[:-][0-9a-f]{64}$"}}],
            "head": _op("Whether the blob exists", errors=(400, 404)),
            "post": {**_op("Upload a blob; its sha256 is verified", errors=(400,)),
                     "requestBody": {"content": {"application/octet-stream": {"schema": {
                         "type": "string", "format": "binary"}}}}}},
        "/v1/chat/completions": {"post": _op("OpenAI chat completions", oa_chat, stream="text/event-stream")},
        "/v1/completions": {"post": _op("OpenAI completions", oa_completion, stream="text/event-stream")},
        "/v1/embeddings": {"post": _op("OpenAI embeddings", _body({"model": {"type": "string"},
                           "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                           "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                           "dimensions": {"type": "integer", "minimum": 1}}, ["model", "input"]))},
        "/v1/messages": {"post": _op("Anthropic Messages: text, tool_use and tool_result blocks, thinking; "
                                     "x-api-key is accepted as the key", messages, stream="text/event-stream")},
        "/v1/responses": {"post": _op("OpenAI Responses, stateless: the whole conversation as input", responses,
                                      stream="text/event-stream")},
        "/v1/models": {"get": _op("OpenAI model list", errors=())},
        "/v1/models/{model}": {"parameters": [{"name": "model", "in": "path", "required": True,
                                               "schema": {"type": "string"}}],
                               "get": _op("One model", errors=(404,))},
        "/health": {"get": _op("Node health with service flags", errors=())},
        "/health/live": {"get": _op("Liveness", errors=())},
        "/health/ready": {"get": _op("Readiness: 503 until started and while draining", errors=(503,))},
        "/api/distributed/status": {"get": _op("Cluster status", errors=())},
        "/api/distributed/nodes": {"get": _op("Cluster nodes with resources", errors=())},
        "/api/distributed/nodes/{node_id}": {
            "parameters": [{"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "delete": _op("Remove a node that is down for good from the cluster's membership",
                          errors=(404, 409, 503))},
        "/api/distributed/nodes/{node_id}/drain": {
            "parameters": [{"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": _accepted(_op(
                "Drain a node (id or name, this one or a peer) without stopping it: readiness 503, peers "
                "route elsewhere, queued requests move, running ones get node.drain_timeout_s, then migrate",
                ok="Accepted", errors=(404, 409)))},
        "/api/distributed/nodes/{node_id}/undrain": {
            "parameters": [{"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": _op("End a node's drain: it takes requests again", errors=(404, 409))},
        "/api/distributed/metrics": {"get": _op("Cluster metrics summary", errors=())},
        "/api/distributed/queue": {"get": {
            "summary": "This node's requests per model, running and queued (tenant, priority, position, "
                       "age), and each tenant's virtual token counter",
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": _QUEUE}}}}}},
        "/api/distributed/token": {"get": {
            "summary": "Gone: the join token is never served over HTTP; `cluster token` on the node reads it",
            "responses": {"410": {"description": "Always", "content": {"application/json": {"schema": _ERR}}}}}},
        "/api/distributed/models": {"get": _op("Models and the nodes holding them", errors=())},
        "/api/distributed/replication/status": {"get": _op(
            "Peer-to-peer model replication: blob transfers in progress (direction, peer, digest, offset, "
            "bytes, total, bytes_per_sec), models being replicated, totals, tombstones", errors=(409,))},
        "/api/distributed/rebalance": {"post": _op(
            "Place every model (or one) anew, spread by bytes over the nodes that can hold it; returns "
            "the moves", _body({"model": {"type": "string"}, "dry_run": {"type": "boolean"}}, []),
            errors=(400, 404, 409))},
        "/api/distributed/migrate": {"post": _accepted(_op(
            "Move a model's copy from one node to another (202: committed; the copy then moves)",
            _body({"model": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"}},
                  ["model", "from", "to"]), ok="Accepted", errors=(400, 404, 409)))},
        "/api/distributed/placement": {"post": _op(
            "A model's placement policy: replicas and the node labels it needs",
            _body({"model": {"type": "string"}, "replicas": {"type": ["integer", "null"]},
                   "node_labels": {"type": "object", "additionalProperties": {"type": "string"}}},
                  ["model"]), errors=(400, 409))},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/openapi.json": {"get": _op("This document", errors=())},
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
