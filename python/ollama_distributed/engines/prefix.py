"""The text a request's prompt prefix is routed on (scheduler.policy prefix_aware).

The Rust router hashes this text in fixed-size blocks (rust/scheduler/prefix.rs)
and sends a request where most of its leading blocks are warm. Nodes advertise
the same hashes for the prompts their engine keeps warm (`Engine.warm_prompts`:
the rendered prompts), so the entry node's text must be the rendered prompt
whenever it can be had without the model: a raw prompt, or a model with a Go
template (every model from an Ollama registry, and the bundled one), rendered
as the llama.cpp engine renders it (engines/templates.render_prompt). A model
with only a Jinja template needs the loaded GGUF to render; such a request, or
one for a model this node does not hold, is keyed on a canonical text of its
messages instead. A serving node remembers both texts of what it ran
(`PromptAliases`) and advertises the hashes of both, so an entry node without
the model matches too (for a Jinja-only model the engine's rendered text is not
the one computed here, and only the entry node's own guesses hold).
"""

from __future__ import annotations

import collections
import functools
import json
import logging

from ..errors import OllamaDistributedError
from ..models.store import ModelRecord
from . import templates
from .base import InferenceRequest

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=32)
def _go_template(source: str) -> templates.GoTemplate | None:
    """A parsed Go template (parsing costs more than rendering); None for Jinja
    or a template that does not parse."""
    if not source or templates.is_jinja(source):
        return None
    try:
        return templates.parse(source)
    except OllamaDistributedError:
        return None


def routing_text(req: InferenceRequest, record: ModelRecord | None) -> str | None:
    """The prompt text to route `req` on; None for a request with no prompt
    prefix to reuse (embeddings)."""
    if req.kind == "embed":
        return None
    if req.kind == "generate" and req.raw:
        return req.prompt
    if record is not None:
        rendered = _rendered(req, record)
        if rendered is not None:
            return rendered
    return canonical_text(req)


def _rendered(req: InferenceRequest, record: ModelRecord) -> str | None:
    """`req` rendered with its Go template exactly as render_prompt does it, or
    None when only the engine can render it (Jinja) or rendering fails (the
    engine will answer that error itself)."""
    source = req.template or record.template
    t = _go_template(source or "")
    if t is None:
        return None
    try:
        think = req.think
        if think is None and "thinking" in t.capabilities():
            think = True  # as render_prompt: a thinking model thinks by default
        tools = req.tools if req.tool_choice != "none" else None
        suffix = req.suffix if req.kind == "generate" else ""
        msgs = templates.chat_messages(record, req)
        return t.render(msgs, tools, think, prompt=req.prompt if suffix else "", suffix=suffix)
    except (OllamaDistributedError, TypeError, ValueError, KeyError) as e:
        logger.debug("cannot render %s's prompt for routing (%s); routing on its messages", req.model, e)
        return None


def canonical_text(req: InferenceRequest) -> str:
    """The request's tools, system prompt and messages in a fixed shape: what
    stays the same between two requests stays the same here, in order."""
    parts = []
    if req.tools:
        parts.append("<tools>" + json.dumps(req.tools, sort_keys=True, separators=(",", ":")))
    if req.kind == "chat":
        for m in req.messages:
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            parts.append(f"<{m.get('role', '')}>{text}")
    else:
        if req.system:
            parts.append(f"<system>{req.system}")
        parts.append(f"<user>{req.prompt}")
    return "".join(parts)


class PromptAliases:
    """The canonical text of each rendered prompt this node ran lately.

    An entry node that does not hold a model cannot render its prompts and
    routes on their canonical text; the engine reports rendered prompts as
    warm. The serving node knows both for the requests it ran, so its advert
    carries the hashes of both and every entry node's key finds a match.
    """

    #: prompts remembered; a few times what an engine keeps warm
    KEPT = 256
    #: longer prompts are not remembered (their hashes would pass the advert's bound anyway)
    MAX_CHARS = 256 * 1024

    def __init__(self) -> None:
        self._canonical: collections.OrderedDict[str, str] = collections.OrderedDict()

    def note(self, req: InferenceRequest, record: ModelRecord | None) -> None:
        """`req` is about to run here (its rendered text is what the engine sees)."""
        rendered = routing_text(req, record)
        if rendered is None or len(rendered) > self.MAX_CHARS:
            return
        canonical = canonical_text(req)
        if canonical == rendered:
            return
        self._canonical[rendered] = canonical
        self._canonical.move_to_end(rendered)
        while len(self._canonical) > self.KEPT:
            self._canonical.popitem(last=False)

    def expand(self, warm: dict[str, list[str]]) -> dict[str, list[str]]:
        """`warm` (Engine.warm_prompts) with each prompt's canonical text after it, when known."""
        out: dict[str, list[str]] = {}
        for model, prompts in warm.items():
            texts = []
            for p in prompts:
                texts.append(p)
                alias = self._canonical.get(p)
                if alias is not None:
                    texts.append(alias)
            out[model] = texts
        return out
