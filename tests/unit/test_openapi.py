"""The OpenAPI description covers every route the API app registers, with its
method, and the request fields of the agents' surface; it is valid OpenAPI
3.1, every schema in it valid JSON Schema, and every answer described in the
shape of its API."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from ollama_distributed.api import openapi_schemas as s
from ollama_distributed.api.app import create_app
from ollama_distributed.api.openapi import spec
from ollama_distributed.config import Config
from ollama_distributed.metrics import Metrics

jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="pip install -r requirements-dev.txt (schemathesis)")


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


def _schemas(doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every schema the document holds: parameters, request bodies, answers."""
    for path, item in doc["paths"].items():
        for p in item.get("parameters", []):
            yield f"{path} {p['name']}", p["schema"]
        for method, op in item.items():
            if method == "parameters":
                continue
            for p in op.get("parameters", []):
                yield f"{method} {path} {p['name']}", p["schema"]
            for media, m in op.get("requestBody", {}).get("content", {}).items():
                yield f"{method} {path} request {media}", m["schema"]
            for status, answer in op["responses"].items():
                for media, m in answer.get("content", {}).items():
                    yield f"{method} {path} {status} {media}", m["schema"]


def test_the_document_is_valid_openapi_3_1() -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    validator = jsonschema_rs.validator_for(OPENAPI_31)
    errors = [f"{list(e.instance_path)}: {e.message}" for e in validator.iter_errors(spec())]
    assert not errors, errors[:10]
    # and the check can fail
    broken = {**spec(), "paths": {"/x": {"get": {"responses": {"200": {"description": 1}}}}}}
    assert not validator.is_valid(broken)


def test_every_schema_is_valid_json_schema() -> None:
    schemas = list(_schemas(spec()))
    assert len(schemas) > 150, len(schemas)
    bad = [where for where, schema in schemas if not jsonschema_rs.meta.is_valid(schema)]
    assert not bad, bad
    assert not jsonschema_rs.meta.is_valid({"type": "objekt"})


# Ollama answers these with a bare 200 (201 for a blob)
NO_BODY = {("post", "/api/copy"), ("delete", "/api/delete"), ("post", "/api/blobs/{digest}")}


def test_every_answer_is_described() -> None:
    """Each status has a description, each error its API's error shape, and each
    success a body schema unless it has none (NO_BODY, HEAD)."""
    doc = spec()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, answer in op["responses"].items():
                assert answer["description"], (method, path, status)
                if method == "head":
                    assert "content" not in answer, (path, status)
                    continue
                code = int(status)
                if code >= 400 and not (path.startswith("/health") and code == 503):
                    want = (s.ANTHROPIC_ERROR if path.startswith("/v1/messages") else
                            s.OPENAI_ERROR if path.startswith("/v1/") else s.ERROR)
                    assert answer["content"]["application/json"]["schema"] == want, (method, path, status)
                elif (method, path) not in NO_BODY:
                    assert answer.get("content"), (method, path, status)
    assert set(doc["paths"]["/api/copy"]["post"]["responses"]["200"]) == {"description"}  # Ollama: no body


def test_answers_the_handlers_send_match_their_schemas() -> None:
    """A few answers as the handlers build them, against the schemas (the
    fuzz test sends them over HTTP; this keeps the schemas from drifting
    where the fuzzer seldom reaches)."""
    def valid(schema: Any, value: Any) -> bool:
        return bool(jsonschema_rs.validator_for(schema).is_valid(value))

    assert valid(s.GENERATE, {"model": "m", "created_at": "2026-12-01T04:21:48.914089Z", "response": "hi",
                              "done": True, "done_reason": "stop", "total_duration": 1, "eval_count": 1})
    assert not valid(s.GENERATE, {"model": "m", "response": "hi", "done": True})  # no created_at
    assert valid(s.OPENAI_ERROR, {"error": {"message": "x", "type": "invalid_request_error", "param": None,
                                            "code": None}})
    assert not valid(s.ERROR, {"error": {"message": "x"}})
    assert valid(s.ANTHROPIC_ERROR, {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}})
