"""One interface for every engine: llama.cpp in-process, upstream servers, mock.

Engines speak in the internal request type and JSON-able chunks, so the same
chunks stream to a local client or across QUIC to a peer:

- a text chunk:   {"text": "...", "logprobs"?: [{"token", "logprob", "bytes", "top_logprobs"?: [...]}],
                   "tokens"?: [ids]}
  `tokens` (llamacpp, mock) are the ids generated since the previous text
  chunk, this text included: all of them, so that prompt + every id received
  so far is exactly where generation stands once this text is out. The entry
  node keeps them to resume the stream elsewhere (mid-stream migration); the
  APIs never show them.
- a thinking chunk: {"thinking": "..."}       (split from the text for thinking templates)
- a tool call chunk: {"tool_calls": [{"id": "call_...", "function": {"index": i, "name": "...",
                                       "arguments": {...}}}]}   (Ollama's shape; arguments an object)
- the last chunk: {"done": True, "done_reason": "stop"|"length"|"load"|"unload",
                   "prompt_eval_count", "prompt_eval_duration", "eval_count",
                   "eval_duration", "load_duration", "total_duration", "context"?,
                   "prompt_cached_count"?}
  `prompt_eval_count` counts the prompt tokens really evaluated (as Ollama's);
  `prompt_cached_count` those whose KV was already there (a warm prefix).

A continuation (`InferenceRequest.continuation`, the ids another node already
generated) runs the same prompt with those ids appended, without re-emitting
their text, and goes on from there; `eval_count` and `prompt_eval_count` then
count only its own new tokens and the prompt proper. Only engines with
`continues = True` take one; the dispatcher marks the first chunk of a
continuation `"continued": n` so the entry node knows the node understood it
(a node from before migration existed would silently start over).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..models.store import ModelRecord


@dataclass
class InferenceRequest:
    """A request as every API and engine sees it, whatever its wire format."""

    kind: str  # "generate" | "chat" | "embed"
    model: str
    prompt: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    system: str | None = None
    template: str | None = None
    raw: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    format: Any = None  # "json" or a JSON schema
    keep_alive: Any = None
    context: list[int] | None = None
    input: list[str] = field(default_factory=list)  # embed
    truncate: bool = True
    normalize: bool = True  # /api/embed normalises; legacy /api/embeddings does not
    stream: bool = True
    request_id: str = ""
    # The agents' surface (Ollama 2026, OpenAI, Anthropic), in Ollama's terms:
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {name, description, parameters}}]
    tool_choice: Any = None  # None/"auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    think: Any = None  # None | bool | "low" | "medium" | "high"
    logprobs: bool = False
    top_logprobs: int = 0  # 0-20
    suffix: str = ""  # generate: fill-in-the-middle
    shift: bool = True  # shift the context window when it is full instead of stopping
    dimensions: int | None = None  # embed: truncate embeddings to this many dimensions
    # Mid-stream migration: token ids another node already generated and the
    # client already has; generation resumes after them (see the module doc).
    continuation: list[int] = field(default_factory=list)
    # Who asks, for the local queue's fairness (rust/scheduler/fair.rs): the
    # API key's name, the client address or a trusted proxy's X-Tenant; the
    # key's weight; "interactive" or "batch". Set at the entry node, carried
    # to the node that serves the request.
    tenant: str = ""
    weight: float = 1.0
    priority: str = "interactive"

    def to_dict(self) -> dict[str, Any]:
        """Its fields, for JSON: shallow (asdict's deep copy cost more than the
        encoding on the forwarding path, and the result is encoded at once)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InferenceRequest:
        known = cls.__dataclass_fields__
        req = cls(**{k: v for k, v in d.items() if k in known})
        # from a peer: a value of the wrong shape falls back to the default
        # rather than reaching the scheduler
        if not isinstance(req.tenant, str) or len(req.tenant) > MAX_TENANT:
            req.tenant = ""
        w = req.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < float("inf"):
            req.weight = 1.0
        if req.priority not in PRIORITIES:
            req.priority = "interactive"
        return req


PRIORITIES = ("interactive", "batch")
MAX_TENANT = 128


class CancelToken:
    """Set when the client goes away; engine threads check it between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class LoadedModel:
    name: str
    digest: str
    size: int
    expires_at: float | None  # unix seconds; None: kept forever
    details: dict[str, Any]
    context_length: int = 0
    # a model split across nodes (engines/split.py): each node's share
    parts: list[dict[str, Any]] | None = None


class Engine(Protocol):
    """What the dispatcher needs from an engine."""

    kind: str
    #: True when the engine resumes a `continuation` exactly (llamacpp, mock).
    continues: bool
    #: True when the engine serves models of the local store (llamacpp, mock);
    #: upstream engines list their upstream's models instead.
    uses_store: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(
        self, req: InferenceRequest, record: ModelRecord | None, slot: int, cancel: CancelToken
    ) -> AsyncGenerator[dict[str, Any], None]: ...

    async def embed(self, req: InferenceRequest, record: ModelRecord | None) -> dict[str, Any]: ...

    async def load(self, req: InferenceRequest, record: ModelRecord | None) -> float: ...

    async def unload(self, model: str) -> None: ...

    def loaded(self) -> list[LoadedModel]: ...

    async def list_models(self) -> list[dict[str, Any]]: ...

    def touch(self, model: str, keep_alive: float | None) -> None: ...

    def configure(self, num_parallel: int, max_loaded_models: int) -> None: ...

    def warm_prompts(self) -> dict[str, list[str]]:
        """Model name -> the prompt texts (as given to the engine, i.e. the
        rendered prompt) whose KV state this node keeps warm now. The node
        advertises their prefix hashes so the routers of every entry node
        (scheduler.policy prefix_aware) correct their guesses within an
        advert period."""
        ...
