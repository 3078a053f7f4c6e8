"""The JSON Schemas /api/openapi.json is built from: request parts shared by
several operations, and what each API answers (Ollama's, OpenAI's,
Anthropic's and the cluster's bodies, their error shapes and their stream
items). openapi.py puts them together into operations.

Answers are described as they are sent: required lists the fields every
answer has, and objects stay open (`additionalProperties` allowed), as the
APIs they copy add fields over time and clients ignore what they do not know.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
NUM: Schema = {"type": "number"}
INT: Schema = {"type": "integer"}
COUNT: Schema = {"type": "integer", "minimum": 0}
TIME: Schema = {"type": "string", "format": "date-time"}
STRS: Schema = {"type": "array", "items": STR}
OBJ: Schema = {"type": "object", "additionalProperties": True}
NULL_STR: Schema = {"type": ["string", "null"]}


def obj(props: dict[str, Any], required: list[str] | tuple[str, ...] = ()) -> Schema:
    return {"type": "object", "properties": props, "required": list(required)}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


# ---- requests -----------------------------------------------------------------------

OPTIONS: Schema = {"type": "object", "description": "Ollama options: temperature, top_p, top_k, min_p, "
                   "repeat_penalty, seed, num_predict, stop, num_ctx, ...", "additionalProperties": True}
KEEP_ALIVE: Schema = {"oneOf": [STR, NUM],
                      "description": "How long the model stays loaded: '5m', 0 unloads, -1 keeps it"}
FORMAT: Schema = {"oneOf": [{"type": "string", "enum": ["json"]}, {"type": "object"}]}
TOOL_CALL: Schema = obj({
    "id": STR, "type": {"type": "string", "enum": ["function"]},
    "function": obj({"index": INT, "name": STR,
                     "arguments": {"oneOf": [{"type": "object"}, STR],
                                   "description": "an object (Ollama) or its JSON text (OpenAI)"}}, ["name"])},
    ["function"])
MESSAGE: Schema = obj({
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]}, "content": STR,
    "images": STRS, "thinking": STR, "tool_calls": array(TOOL_CALL),
    "tool_name": {"type": "string", "description": "role tool: the function whose result this is"},
    "tool_call_id": {"type": "string", "description": "role tool: the call it answers (must match one)"}},
    ["role"])
TOOLS: Schema = {"type": "array", "description": "Functions the model may call; parameters is a JSON Schema object",
                 "items": obj({"type": {"type": "string", "enum": ["function"]},
                               "function": obj({"name": STR, "description": STR, "parameters": {"type": "object"}},
                                               ["name"])}, ["function"])}
TOOL_CHOICE: Schema = {
    "oneOf": [{"type": "string", "enum": ["auto", "none", "required"]},
              {"type": "object", "properties": {"type": {"type": "string", "enum": ["function"]},
                                                "function": obj({"name": STR}, ["name"])}}],
    "description": "required or a named function constrains decoding to one valid call "
                   "(on /api/chat an extension: Ollama has none)"}
THINK: Schema = {"oneOf": [BOOL, {"type": "string", "enum": ["low", "medium", "high", "max"]}],
                 "description": "Thinking models: the thinking comes apart in message.thinking (thinking on "
                                "/api/generate); 400 for a model without a thinking template"}
IMAGES: Schema = {"type": "array", "items": {"type": "string", "contentEncoding": "base64"},
                  "description": "Parsed and checked; refused, as no served model has vision"}
LOGPROBS: Schema = {"type": "boolean", "description": "Return each token's log probability (from the logits)"}
TOP_LOGPROBS: Schema = {"type": "integer", "minimum": 0, "maximum": 20,
                        "description": "How many likeliest alternatives to return per token"}
TRUNCATE: Schema = {"type": "boolean", "description": "Keep the end of an input longer than the context "
                    "(default); false: a 400 instead"}
SHIFT: Schema = {"type": "boolean", "description": "Shift the context window when it is full instead of stopping"}
TEXTS: Schema = {"oneOf": [STR, STRS]}


# ---- errors -------------------------------------------------------------------------

ERROR: Schema = obj({"error": STR}, ["error"])
OPENAI_ERROR: Schema = obj({"error": obj({"message": STR, "type": STR, "param": NULL_STR, "code": NULL_STR},
                                         ["message", "type"])}, ["error"])
ANTHROPIC_ERROR: Schema = obj({"type": {"const": "error"}, "error": obj({"type": STR, "message": STR},
                                                                         ["type", "message"])},
                              ["type", "error"])


# ---- Ollama's answers ---------------------------------------------------------------

_TOKEN_LOGPROB: Schema = obj({"token": STR, "logprob": NUM, "bytes": array(INT)}, ["token", "logprob"])
TOKEN_LOGPROBS: Schema = array({**_TOKEN_LOGPROB, "properties": {**_TOKEN_LOGPROB["properties"],
                                                                 "top_logprobs": array(_TOKEN_LOGPROB)}})
_STATS: dict[str, Schema] = {k: COUNT for k in ("total_duration", "load_duration", "prompt_eval_count",
                                                "prompt_eval_duration", "eval_count", "eval_duration")}
_ANSWER: dict[str, Schema] = {"model": STR, "created_at": TIME, "done": BOOL, "done_reason": STR, **_STATS,
                              "logprobs": TOKEN_LOGPROBS}
GENERATE: Schema = obj({**_ANSWER, "response": STR, "thinking": STR, "context": array(INT)},
                       ["model", "created_at", "response", "done"])
CHAT: Schema = obj({**_ANSWER, "message": obj({"role": {"const": "assistant"}, "content": STR, "thinking": STR,
                                               "tool_calls": array(TOOL_CALL)}, ["role", "content"])},
                   ["model", "created_at", "message", "done"])
EMBED: Schema = obj({"model": STR, "embeddings": array(array(NUM)), "total_duration": COUNT,
                     "load_duration": COUNT, "prompt_eval_count": COUNT}, ["model", "embeddings"])
EMBEDDING: Schema = obj({"embedding": array(NUM)}, ["embedding"])
PROGRESS: Schema = obj({"status": STR, "digest": STR, "total": COUNT, "completed": COUNT}, ["status"])
_DETAILS: Schema = obj({"parent_model": STR, "format": STR, "family": STR, "families": {"type": ["array", "null"],
                        "items": STR}, "parameter_size": STR, "quantization_level": STR})
SHOW: Schema = obj({"modelfile": STR, "parameters": STR, "template": STR, "system": STR, "license": STR,
                    "details": _DETAILS, "model_info": OBJ, "capabilities": STRS, "modified_at": TIME},
                   ["modelfile", "details", "model_info", "capabilities"])
_LISTED: dict[str, Schema] = {"name": STR, "model": STR, "size": COUNT, "digest": STR, "details": _DETAILS}
TAGS: Schema = obj({"models": array(obj({**_LISTED, "modified_at": TIME},
                                        ["name", "model", "modified_at", "size", "digest", "details"]))},
                   ["models"])
# a model split across nodes (engines/split.py): each node's share, this node first
_PART: Schema = obj({"node": STR, "local": BOOL, "memory_mib": COUNT, "share_mib": COUNT, "layers": COUNT},
                    ["node", "local", "memory_mib", "share_mib", "layers"])
PS: Schema = obj({"models": array(obj({**_LISTED, "expires_at": TIME, "size_vram": COUNT, "context_length": COUNT,
                                       "parts": array(_PART)},
                                      ["name", "model", "size", "digest", "details", "expires_at", "size_vram"]))},
                 ["models"])
VERSION: Schema = obj({"version": STR}, ["version"])


# ---- OpenAI's answers ---------------------------------------------------------------

_USAGE: Schema = obj({"prompt_tokens": COUNT, "completion_tokens": COUNT, "total_tokens": COUNT},
                     ["prompt_tokens", "total_tokens"])
_FINISH: Schema = {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", "content_filter", None]}
_CHOICE_LOGPROBS: Schema = {"type": ["object", "null"]}
_OA_MESSAGE: Schema = obj({"role": {"const": "assistant"}, "content": NULL_STR, "reasoning": STR,
                           "tool_calls": array(TOOL_CALL)}, ["role", "content"])
_OA_ANSWER: dict[str, Schema] = {"id": STR, "created": COUNT, "model": STR, "system_fingerprint": STR,
                                 "usage": _USAGE}
CHAT_COMPLETION: Schema = obj({
    **_OA_ANSWER, "object": {"const": "chat.completion"},
    "choices": array(obj({"index": COUNT, "message": _OA_MESSAGE, "logprobs": _CHOICE_LOGPROBS,
                          "finish_reason": _FINISH}, ["index", "message", "finish_reason"]))},
    ["id", "object", "created", "model", "choices", "usage"])
CHAT_COMPLETION_CHUNK: Schema = obj({
    **_OA_ANSWER, "object": {"const": "chat.completion.chunk"},
    "choices": array(obj({"index": COUNT, "delta": obj({"role": {"const": "assistant"}, "content": NULL_STR,
                                                         "reasoning": STR, "tool_calls": array(TOOL_CALL)}),
                          "logprobs": _CHOICE_LOGPROBS, "finish_reason": _FINISH}, ["index", "delta"]))},
    ["id", "object", "created", "model", "choices"])
_COMPLETION_CHOICES: Schema = array(obj({"index": COUNT, "text": STR, "logprobs": _CHOICE_LOGPROBS,
                                         "finish_reason": _FINISH}, ["index", "text", "finish_reason"]))
COMPLETION: Schema = obj({**_OA_ANSWER, "object": {"const": "text_completion"}, "choices": _COMPLETION_CHOICES},
                         ["id", "object", "created", "model", "choices", "usage"])
COMPLETION_CHUNK: Schema = obj({**_OA_ANSWER, "object": {"const": "text_completion"},
                                "choices": _COMPLETION_CHOICES}, ["id", "object", "created", "model", "choices"])
OA_EMBEDDINGS: Schema = obj({
    "object": {"const": "list"}, "model": STR, "usage": _USAGE,
    "data": array(obj({"object": {"const": "embedding"}, "index": COUNT,
                       "embedding": {"oneOf": [array(NUM), {"type": "string", "contentEncoding": "base64",
                                                            "description": "little-endian float32"}]}},
                      ["object", "index", "embedding"]))},
    ["object", "data", "model", "usage"])
OA_MODEL: Schema = obj({"id": STR, "object": {"const": "model"}, "created": COUNT, "owned_by": STR},
                       ["id", "object", "created", "owned_by"])
OA_MODELS: Schema = obj({"object": {"const": "list"}, "data": array(OA_MODEL)}, ["object", "data"])
# A stream's error after its first event, as OpenAI's clients read it
OA_STREAM_ERROR: Schema = obj({"error": obj({"message": STR}, ["message"])}, ["error"])


# ---- Anthropic's and OpenAI Responses' answers --------------------------------------

MESSAGE_ANSWER: Schema = obj({
    "id": STR, "type": {"const": "message"}, "role": {"const": "assistant"}, "model": STR,
    "content": array(obj({"type": {"type": "string", "enum": ["text", "thinking", "redacted_thinking",
                                                              "tool_use"]}}, ["type"])),
    "stop_reason": {"type": ["string", "null"], "enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use",
                                                         "pause_turn", "refusal", None]},
    "stop_sequence": NULL_STR,
    "usage": obj({"input_tokens": COUNT, "output_tokens": COUNT}, ["input_tokens", "output_tokens"])},
    ["id", "type", "role", "model", "content", "stop_reason", "usage"])
RESPONSE: Schema = obj({
    "id": STR, "object": {"const": "response"}, "created_at": COUNT, "model": STR,
    "status": {"type": "string", "enum": ["completed", "incomplete", "in_progress", "failed"]},
    "output": array(obj({"id": STR, "type": {"type": "string", "enum": ["message", "function_call", "reasoning"]}},
                        ["type"])),
    "usage": {"type": ["object", "null"]}},
    ["id", "object", "created_at", "model", "status", "output"])
# Every event of these streams names its type in its data as well
TYPED_EVENT: Schema = obj({"type": STR}, ["type"])


# ---- the cluster's answers ----------------------------------------------------------

_SERVICES: Schema = obj({"api": BOOL, "p2p": BOOL, "consensus": BOOL, "scheduler": BOOL, "engine": STR})
HEALTH: Schema = obj({"status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy"]},
                      "draining": BOOL, "failed_tasks": OBJ, "timestamp": TIME, "version": STR, "node_id": STR,
                      "uptime_seconds": COUNT, "services": _SERVICES},
                     ["status", "timestamp", "version", "node_id", "services"])
LIVE: Schema = obj({"status": {"const": "alive"}, "timestamp": TIME}, ["status", "timestamp"])
READY: Schema = obj({"status": {"type": "string", "enum": ["ready", "draining", "starting"]}, "timestamp": TIME},
                    ["status", "timestamp"])
CLUSTER_STATUS: Schema = obj({
    "distributed_mode": BOOL, "fallback_mode": BOOL, "node_id": STR, "role": STR, "leader_id": NULL_STR,
    "degraded": BOOL, "cluster_size": COUNT, "data_dir": STR, "services": OBJ, "active_nodes": STRS,
    "scheduler_stats": OBJ, "runner_stats": OBJ, "integration_stats": OBJ, "timestamp": TIME},
    ["node_id", "role", "cluster_size", "active_nodes", "timestamp"])
NODES: Schema = obj({"nodes": array(obj({"id": STR, "name": STR, "status": STR, "role": STR, "models": STRS,
                                         "loaded_models": STRS, "resources": OBJ, "in_flight": COUNT,
                                         "queue_depth": COUNT, "draining": BOOL, "local": BOOL},
                                        ["id", "status"])), "timestamp": TIME}, ["nodes", "timestamp"])
NODE_REMOVED: Schema = obj({"removed": STR, "timestamp": TIME}, ["removed", "timestamp"])
NODE_DRAIN: Schema = obj({"node": STR, "draining": BOOL, "changed": BOOL, "in_flight": COUNT, "timestamp": TIME},
                         ["node", "draining", "timestamp"])
CLUSTER_METRICS: Schema = obj({
    "timestamp": TIME, "node_id": STR, "connected_peers": COUNT, "is_leader": BOOL, "requests_processed": COUNT,
    "tokens_generated": COUNT, "in_flight": COUNT, "queue_depth": COUNT, "models_loaded": COUNT,
    "nodes_total": COUNT, "nodes_online": COUNT, "uptime": COUNT, "version": STR},
    ["timestamp", "node_id", "nodes_total", "nodes_online"])
CLUSTER_MODELS: Schema = obj({"models": array(obj({"name": STR, "size": COUNT, "digest": STR, "nodes": STRS,
                                                   "loaded_on": STRS, "replicas": COUNT, "holders": STRS},
                                                  ["name", "nodes"])), "timestamp": TIME},
                             ["models", "timestamp"])
REPLICATION: Schema = obj({"node_id": STR, "replicas": COUNT, "transfers": array(OBJ), "totals": OBJ,
                           "models_in_progress": array({}), "models": array(OBJ), "tombstones": OBJ,
                           "timestamp": TIME}, ["node_id", "transfers", "totals", "timestamp"])
REBALANCE: Schema = obj({"moves": array(OBJ), "committed": BOOL, "timestamp": TIME},
                        ["moves", "committed", "timestamp"])
MIGRATE: Schema = obj({"status": {"const": "scheduled"}, "timestamp": TIME}, ["status", "timestamp"])
PLACEMENT: Schema = obj({"model": STR, "replicas": {"type": ["integer", "null"]},
                         "node_labels": {"type": "object", "additionalProperties": STR}, "timestamp": TIME},
                        ["model", "replicas", "node_labels", "timestamp"])
OPENAPI: Schema = obj({"openapi": STR, "info": OBJ, "paths": OBJ}, ["openapi", "info", "paths"])
