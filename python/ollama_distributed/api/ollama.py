"""Ollama's HTTP API (docs/api.md): wire format in, InferenceRequest out, and back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..engines import templates
from ..engines.base import InferenceRequest
from ..engines.templates import is_jinja  # the test the engine renders by
from ..engines.toolcalls import validate_tool_choice, validate_tools
from ..errors import BadRequestError, ModelNotFoundError, NotAvailableError
from ..models import catalog, gguf_info, names, registry
from ..models.fsutil import storage_error
from ..models.store import ModelRecord
from .common import (
    field,
    gather,
    images,
    iso,
    normalise,
    now_iso,
    read_json,
    refuse_images,
    stream_lines,
    top_logprobs,
)
from .messages import ollama_messages, parse_think

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger(__name__)
NDJSON = "application/x-ndjson"


def _node(request: web.Request) -> Node:
    node: Node = request.app["node"]
    return node


def _ndjson(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _options(body: dict[str, Any]) -> dict[str, Any]:
    return dict(field(body, "options", dict, {}))


def _format(body: dict[str, Any]) -> Any:
    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    raise BadRequestError('format must be "json" or a JSON schema object')


def _keep_alive(body: dict[str, Any]) -> Any:
    return field(body, "keep_alive", (str, int, float))


STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
         "eval_count", "eval_duration")


def _final_stats(final: dict[str, Any]) -> dict[str, Any]:
    out = {"done_reason": final.get("done_reason", "stop")}
    for key in STATS:
        if key in final:
            out[key] = final[key]
    return out


# ---- generate / chat -----------------------------------------------------------


def _request_template(request: web.Request, body: dict[str, Any]) -> str | None:
    """A per-request `template`: refused when api.allow_request_templates is
    false, and capped at api.max_template_bytes (rendering it is work the
    caller chooses)."""
    template: str | None = field(body, "template", str)
    if not template:
        return template
    api = _node(request).cfg.api
    if not api.allow_request_templates:
        raise BadRequestError("a per-request template is not allowed on this node "
                              "(api.allow_request_templates is false); use the model's own template")
    if len(template.encode("utf-8", "surrogatepass")) > api.max_template_bytes:
        raise BadRequestError(f"template is longer than api.max_template_bytes ({api.max_template_bytes} bytes)")
    if is_jinja(template):
        # Jinja has loops: a few bytes can render for hours. Ollama's Go
        # subset here has none, so its rendering time is bounded by its size.
        raise BadRequestError("a per-request template uses Ollama's Go template syntax ({{ .System }}, "
                              "{{ .Prompt }}, {{ if }}); Jinja is accepted only in a model's own template")
    return template


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = field(body, "model", str, required=True)
    names.parse(model)
    ctx = field(body, "context", list)
    if ctx is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in ctx):
        raise BadRequestError("context must be a list of integers")
    if images(body.get("images"), "images"):
        refuse_images(model)
    req = InferenceRequest(
        kind="generate",
        model=model,
        prompt=field(body, "prompt", str, ""),
        system=field(body, "system", str),
        template=_request_template(request, body),
        raw=field(body, "raw", bool, False),
        options=_options(body),
        format=_format(body),
        keep_alive=_keep_alive(body),
        context=ctx,
        stream=field(body, "stream", bool, True),
        logprobs=field(body, "logprobs", bool, False),
        top_logprobs=top_logprobs(body),
        suffix=field(body, "suffix", str, ""),
        shift=field(body, "shift", bool, True),
        truncate=field(body, "truncate", bool, True),
        think=parse_think(body),
    )
    if req.raw and (req.template or req.system or req.context):
        raise BadRequestError("raw mode does not support template, system, or context")
    node = _node(request)
    source = node.dispatcher.stream(req, "/api/generate")

    def render(chunk: dict[str, Any]) -> bytes:
        out: dict[str, Any] = {"model": req.model, "created_at": now_iso()}
        if chunk.get("done"):
            out.update(response="", done=True, **_final_stats(chunk))
            if "context" in chunk:
                out["context"] = chunk["context"]
            return _ndjson(out)
        out.update(response=chunk.get("text", ""), done=False)
        if chunk.get("logprobs"):
            out["logprobs"] = chunk["logprobs"]
        if chunk.get("thinking"):
            out["thinking"] = chunk["thinking"]
        return _ndjson(out)

    if req.stream:
        return await stream_lines(request, source, render, NDJSON,
                                  on_error=lambda e: _ndjson({"error": e.message}))
    got = await gather(source)
    final = got.final
    out: dict[str, Any] = {"model": req.model, "created_at": now_iso(), "response": got.text}
    if got.thinking:
        out["thinking"] = got.thinking
    out.update(done=True, **_final_stats(final))
    if "context" in final:
        out["context"] = final["context"]
    if req.logprobs:
        out["logprobs"] = got.logprobs
    return web.json_response(out)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = field(body, "model", str, required=True)
    names.parse(model)
    tools = validate_tools(body.get("tools")) or None
    req = InferenceRequest(
        kind="chat",
        model=model,
        messages=ollama_messages(body),
        options=_options(body),
        format=_format(body),
        keep_alive=_keep_alive(body),
        stream=field(body, "stream", bool, True),
        logprobs=field(body, "logprobs", bool, False),
        top_logprobs=top_logprobs(body),
        shift=field(body, "shift", bool, True),
        truncate=field(body, "truncate", bool, True),
        tools=tools,
        # not in Ollama's API (which ignores it): OpenAI's tool_choice, so an
        # Ollama client can ask for a call too
        tool_choice=validate_tool_choice(body.get("tool_choice"), tools),
        think=parse_think(body),
    )
    node = _node(request)
    source = node.dispatcher.stream(req, "/api/chat")

    def render(chunk: dict[str, Any]) -> bytes:
        out: dict[str, Any] = {"model": req.model, "created_at": now_iso()}
        if chunk.get("done"):
            out.update(message={"role": "assistant", "content": ""}, done=True, **_final_stats(chunk))
            return _ndjson(out)
        message: dict[str, Any] = {"role": "assistant", "content": chunk.get("text", "")}
        if chunk.get("thinking"):
            message["thinking"] = chunk["thinking"]
        if chunk.get("tool_calls"):
            message["tool_calls"] = chunk["tool_calls"]
        out.update(message=message, done=False)
        if chunk.get("logprobs"):
            out["logprobs"] = chunk["logprobs"]
        return _ndjson(out)

    if req.stream:
        return await stream_lines(request, source, render, NDJSON,
                                  on_error=lambda e: _ndjson({"error": e.message}))
    got = await gather(source)
    message: dict[str, Any] = {"role": "assistant", "content": got.text}
    if got.thinking:
        message["thinking"] = got.thinking
    if got.tool_calls:
        message["tool_calls"] = got.tool_calls
    answer = {"model": req.model, "created_at": now_iso(), "message": message, "done": True,
              **_final_stats(got.final)}
    if req.logprobs:
        answer["logprobs"] = got.logprobs
    return web.json_response(answer)


# ---- embeddings -------------------------------------------------------------------


async def embed(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = field(body, "model", str, required=True)
    raw = body.get("input", [])
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    else:
        raise BadRequestError("input must be a string or a list of strings")
    dims = field(body, "dimensions", int)
    if dims is not None and dims < 0:
        raise BadRequestError("dimensions must be a positive integer")
    node = _node(request)
    req = InferenceRequest(kind="embed", model=model, input=inputs, options=_options(body),
                           keep_alive=_keep_alive(body), truncate=field(body, "truncate", bool, True),
                           dimensions=dims or None)
    if not inputs:  # Ollama's preload (or unload with keep_alive 0), routed like inference
        await node.dispatcher.preload(req, "/api/embed")
        return web.json_response({"model": req.model, "embeddings": []})
    result = await node.dispatcher.embed(req, "/api/embed")
    vectors = result["embeddings"]
    if dims:  # as Ollama: the first `dimensions` values, normalised again
        vectors = [normalise(v[:dims]) for v in vectors]
    return web.json_response({"model": req.model, "embeddings": vectors,
                              **{k: result[k] for k in ("total_duration", "load_duration",
                                                        "prompt_eval_count") if k in result}})


async def embeddings(request: web.Request) -> web.Response:
    """The legacy endpoint: one prompt, one vector, not normalised."""
    body = await read_json(request)
    model = field(body, "model", str, required=True)
    prompt = field(body, "prompt", str, "")
    node = _node(request)
    if not prompt:
        await node.dispatcher.resolve(model)
        return web.json_response({"embedding": []})
    req = InferenceRequest(kind="embed", model=model, input=[prompt], options=_options(body),
                           keep_alive=_keep_alive(body), normalize=False)
    result = await node.dispatcher.embed(req, "/api/embeddings")
    return web.json_response({"embedding": result["embeddings"][0]})


# ---- models -------------------------------------------------------------------------


def _model_entry(rec: ModelRecord) -> dict[str, Any]:
    return {"name": rec.name.short, "model": rec.name.short, "modified_at": iso(rec.modified_at),
            "size": rec.size, "digest": rec.digest, "details": rec.details}


async def tags(request: web.Request) -> web.Response:
    node = _node(request)
    return web.json_response({"models": await node.catalog_entries()})


async def ps(request: web.Request) -> web.Response:
    node = _node(request)
    models = []
    for lm in node.engine.loaded():
        models.append({
            "name": lm.name, "model": lm.name, "size": lm.size, "digest": lm.digest,
            "details": lm.details,
            "expires_at": iso(lm.expires_at) if lm.expires_at else "0001-01-01T00:00:00Z",
            "size_vram": 0, "context_length": lm.context_length,
            # a model split across nodes (engines/split.py): which node holds which share
            **({"parts": lm.parts} if lm.parts else {}),
        })
    return web.json_response({"models": models})


_info_cache: dict[str, dict[str, Any]] = {}


def _gguf(rec: ModelRecord) -> dict[str, Any]:
    if rec.model_path is None or rec.model_digest is None:
        return {}
    cached = _info_cache.get(rec.model_digest)
    if cached is None:
        cached = gguf_info.read(rec.model_path)
        _info_cache[rec.model_digest] = cached
    return cached


def _modelfile(rec: ModelRecord, template: str) -> str:
    lines = [f"# Modelfile generated by ollama-distributed for {rec.name.short}",
             f"FROM {rec.model_path or rec.name.short}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if rec.system:
        lines.append(f'SYSTEM """{rec.system}"""')
    for k, v in rec.parameters.items():
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"PARAMETER {k} {json.dumps(item) if isinstance(item, str) else item}")
    if rec.license:
        lines.append(f'LICENSE """{rec.license}"""')
    return "\n".join(lines) + "\n"


def _capabilities(template: str, info: dict[str, Any]) -> list[str]:
    """As Ollama derives them: `completion` (`embedding` alone for a pooling-only
    model), what the template allows (`tools`, `insert`, `thinking`); and
    `embedding`, since this engine embeds with any model (mean pooling)."""
    pooling = "pooling_type" in {k.rsplit(".", 1)[-1] for k in info.get("model_info", {})}
    caps = templates.capabilities(template, embedding_only=pooling)
    if "embedding" not in caps:
        caps.insert(1, "embedding")
    return caps


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = body.get("model") or body.get("name")
    node = _node(request)
    if not node.engine.uses_store:
        raise NotAvailableError(f"show is not available for models of the {node.engine.kind} upstream")
    rec = await asyncio.to_thread(node.store.get, model)
    info = await asyncio.to_thread(_gguf, rec)
    template = rec.template or info.get("chat_template") or ""
    model_info = dict(info.get("model_info", {}))
    if not field(body, "verbose", bool, False):
        model_info = {k: (None if isinstance(v, list) and len(v) > 8 else v) for k, v in model_info.items()}
    params = "\n".join(
        f"{k:<20}{json.dumps(i) if isinstance(i, str) else i}"
        for k, v in rec.parameters.items() for i in (v if isinstance(v, list) else [v])
    )
    out: dict[str, Any] = {
        "modelfile": _modelfile(rec, template),
        "parameters": params,
        "template": template,
        "details": rec.details,
        "model_info": model_info,
        "capabilities": _capabilities(template, info),
        "modified_at": iso(rec.modified_at),
    }
    if rec.system:
        out["system"] = rec.system
    if rec.license:
        out["license"] = rec.license
    return web.json_response(out)


async def create(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    node = _node(request)
    stream = field(body, "stream", bool, True)
    statuses: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def progress(msg: str) -> None:
        loop.call_soon_threadsafe(statuses.put_nowait, msg)

    async def run() -> dict[str, Any]:
        rec = await asyncio.to_thread(catalog.create, node.store, body, progress)
        await node.models_changed()
        return {"model": rec.name.short}

    if not stream:
        await run()
        return web.json_response({"status": "success"})

    task = asyncio.create_task(run())
    task.add_done_callback(lambda _: statuses.put_nowait(None))

    async def source() -> AsyncIterator[dict[str, Any]]:
        while (msg := await statuses.get()) is not None:
            yield {"status": msg}
        task.result()  # raises the create's error
        yield {"status": "success"}

    return await stream_lines(request, source(), _ndjson, NDJSON,
                              on_error=lambda e: _ndjson({"error": e.message}))


async def copy(request: web.Request) -> web.Response:
    body = await read_json(request)
    source = field(body, "source", str, required=True)
    destination = field(body, "destination", str, required=True)
    node = _node(request)
    if node.replicator is not None and not await asyncio.to_thread(node.store.exists, source):
        short = names.parse(source).short
        await node.replicator.known_soon(short, _advert_period(node))  # made elsewhere a moment ago
        await node.replicator.fetch_now(short)  # held elsewhere: copy it here first
    await asyncio.to_thread(node.store.copy, source, destination)
    await node.models_changed()
    return web.Response(status=200)


def _advert_period(node: Any) -> float:
    """How long news of a model made at another node may take to arrive here."""
    return float(node.cfg.scheduler.advert_interval_ms) / 1000


async def delete(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = body.get("model") or body.get("name")
    node = _node(request)
    name = names.parse(model).short
    try:
        await asyncio.to_thread(node.store.delete, model)
    except ModelNotFoundError:
        # not here: a delete is cluster-wide, so one held elsewhere goes too
        if node.replicator is None or not await node.replicator.known_soon(name, _advert_period(node)):
            raise
    if node.replicator is not None:  # every node removes its copy (a tombstone in adverts and Raft)
        node.replicator.record_delete(name)
    await node.engine.unload(name)
    await node.models_changed()
    return web.Response(status=200)


async def _transfer(request: web.Request, kind: str) -> web.StreamResponse:
    """/api/pull and /api/push: Ollama's progress statuses as NDJSON, or one
    {"status": "success"} with stream false. Errors found before the first
    status (bad name, model missing in the registry, registry unreachable or
    answering garbage) keep their HTTP status; later ones end the stream as
    an {"error": ...} line, as Ollama does."""
    body = await read_json(request)
    model = body.get("model") or body.get("name")
    names.parse(model)  # a hostile name is a 400 before anything else
    insecure = field(body, "insecure", bool, False)
    stream = field(body, "stream", bool, True)
    node = _node(request)
    if not node.engine.uses_store:
        raise NotAvailableError(f"{kind} is not available for models of the {node.engine.kind} upstream")
    if kind == "pull":
        peers = node.replicator.fetch_blob_for if node.replicator is not None else None
        transfer = registry.pull(node.store, model, insecure=insecure, from_peers=peers,
                                 registries=node.cfg.models.registries)
    else:
        transfer = registry.push(node.store, model, insecure=insecure, registries=node.cfg.models.registries)

    async def source() -> AsyncGenerator[dict[str, Any], None]:
        async for event in transfer:
            if kind == "pull" and event.get("status") == "success":
                await node.models_changed()
            yield event

    if not stream:
        gen = source()
        try:
            async for _ in gen:
                pass
        finally:
            await gen.aclose()
        return web.json_response({"status": "success"})
    return await stream_lines(request, source(), _ndjson, NDJSON,
                              on_error=lambda e: _ndjson({"error": e.message}))


async def pull(request: web.Request) -> web.StreamResponse:
    return await _transfer(request, "pull")


async def push(request: web.Request) -> web.StreamResponse:
    return await _transfer(request, "push")


# ---- blobs ----------------------------------------------------------------------------


async def head_blob(request: web.Request) -> web.Response:
    digest = names.parse_digest(request.match_info["digest"])
    node = _node(request)
    return web.Response(status=200 if node.store.has_blob(digest) else 404)


async def post_blob(request: web.Request) -> web.Response:
    """Stream an upload to a temp file, hashing as it goes; visible only if it matches."""
    expected = names.parse_digest(request.match_info["digest"])
    node = _node(request)
    store = node.store
    if store.has_blob(expected):
        # Drain, so the client isn't cut off mid-send, then say it was already there.
        async for _ in request.content.iter_chunked(1 << 20):
            pass
        return web.Response(status=201)
    fd, tmp = store.new_upload()
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:

            def take(chunk: bytes) -> None:  # hashed and written off the event loop
                h.update(chunk)
                f.write(chunk)

            async for chunk in request.content.iter_chunked(1 << 20):
                await asyncio.to_thread(take, chunk)
            await asyncio.to_thread(os.fsync, f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(e, f"blob sha256:{expected}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    await asyncio.to_thread(store.commit_upload, tmp, expected, h.hexdigest())
    return web.Response(status=201)


# ---- misc ------------------------------------------------------------------------------


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/generate", generate)
    r.add_post("/api/chat", chat)
    r.add_post("/api/embed", embed)
    r.add_post("/api/embeddings", embeddings)
    r.add_post("/api/show", show)
    r.add_post("/api/create", create)
    r.add_post("/api/copy", copy)
    r.add_delete("/api/delete", delete)
    r.add_post("/api/pull", pull)
    r.add_post("/api/push", push)
    r.add_get("/api/tags", tags)
    r.add_get("/api/ps", ps)
    r.add_get("/api/version", version)
    r.add_route("HEAD", "/api/blobs/{digest}", head_blob)
    r.add_post("/api/blobs/{digest}", post_blob)
    r.add_get("/", root)  # aiohttp answers HEAD for GET routes


