from __future__ import annotations

import pytest
from ollama_distributed.errors import BadRequestError
from ollama_distributed.models import names


@pytest.mark.parametrize("raw,short,parts", [
    ("smollm2:135m", "smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m")),
    ("llama3", "llama3:latest", ("registry.ollama.ai", "library", "llama3", "latest")),
    ("me/thing:v1", "me/thing:v1", ("registry.ollama.ai", "me", "thing", "v1")),
    ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t", ("localhost:5000", "ns", "m", "t")),
    ("MiXeD:Tag", "mixed:tag", ("registry.ollama.ai", "library", "mixed", "tag")),
])
def test_parse(raw: str, short: str, parts: tuple[str, ...]) -> None:
    n = names.parse(raw)
    assert n.short == short
    assert n.path_parts() == parts


@pytest.mark.parametrize("raw", [
    "", "   ", None, 5, "../etc/passwd", "/abs/path", "a/../../b", "x:..", "..:x", "a\x00b",
    "a/b/c/d", "bad name", "a\\b", "ns/..", ".hidden", "m:" + "t" * 200, "a/b/c:../x",
])
def test_hostile_names_are_refused(raw: object) -> None:
    with pytest.raises(BadRequestError):
        names.parse(raw)


def test_digest() -> None:
    h = "a" * 64
    assert names.parse_digest(f"sha256:{h}") == h
    assert names.parse_digest(f"sha256-{h}") == h
    for bad in ("sha256:xyz", f"md5:{h}", "sha256:" + "A" * 64, f"sha256:{h}/../x", 3):
        with pytest.raises(BadRequestError):
            names.parse_digest(bad)
