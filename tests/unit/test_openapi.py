"""The OpenAPI description covers every route the API app registers, with its
method, and the request fields of the agents' surface."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from ollama_distributed.api.app import create_app
from ollama_distributed.api.openapi import spec
from ollama_distributed.config import Config
from ollama_distributed.metrics import Metrics


def _fields(doc: dict[str, Any], path: str, method: str = "post") -> set[str]:
    schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return set(schema["properties"])


def test_every_registered_route_and_method_is_described() -> None:
    app = create_app(SimpleNamespace(cfg=Config(), http_ports=[], metrics=Metrics()))  # type: ignore[arg-type]
    paths = spec()["paths"]
    missing = []
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        if path not in paths:
            missing.append(path)
        elif route.method != "HEAD" and route.method.lower() not in paths[path]:
            # aiohttp adds a HEAD beside every GET; a GET's description covers it
            missing.append(f"{route.method} {path}")
    assert not missing, missing


@pytest.mark.parametrize("path,fields", [
    ("/api/generate", {"suffix", "raw", "images", "think", "logprobs", "top_logprobs", "shift", "truncate"}),
    ("/api/chat", {"tools", "think", "logprobs", "top_logprobs", "shift", "truncate"}),
    ("/api/embed", {"dimensions", "truncate"}),
    ("/v1/chat/completions", {"tools", "tool_choice", "logprobs", "top_logprobs"}),
    ("/v1/completions", {"suffix", "logprobs"}),
    ("/v1/embeddings", {"dimensions"}),
    ("/v1/messages", {"model", "max_tokens", "system", "messages", "tools", "tool_choice", "thinking", "stream",
                      "stop_sequences"}),
    ("/v1/responses", {"model", "input", "instructions", "tools", "tool_choice", "stream", "max_output_tokens",
                       "include", "top_logprobs", "text", "reasoning"}),
])
def test_new_fields_are_described(path: str, fields: set[str]) -> None:
    assert fields <= _fields(spec(), path), fields - _fields(spec(), path)


def test_head_version_is_described() -> None:
    assert "head" in spec()["paths"]["/api/version"]
