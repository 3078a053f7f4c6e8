"""The llama.cpp engine's helpers for the agents' fields, on stand-ins for
llama-cpp-python (no model): logprobs from a logits row, fill-in-the-middle
tokens, the context shift; and every field of a request surviving the JSON
that carries it to a peer."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ollama_distributed.engines.base import InferenceRequest
from ollama_distributed.engines.llamacpp import _fill_in_middle, _logprob, _shifting, _with_logprobs
from ollama_distributed.errors import BadRequestError

PIECES = [b"a", b"b", b"c", b"\xc3\xa9", b"e"]


class FakeLlama:
    def __init__(self, logits: list[float]) -> None:
        self._row = (ctypes.c_float * len(logits))(*logits)
        self._ctx = SimpleNamespace(ctx=object())
        self._model = SimpleNamespace(vocab=object())

    def n_vocab(self) -> int:
        return len(self._row)

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(PIECES[t] for t in tokens)

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        return [100 + b for b in text]

    def token_bos(self) -> int:
        return 1


def fake_llama_cpp(llama: FakeLlama, fim: tuple[int, int, int] = (-1, -1, -1), bos: bool = False) -> Any:
    return SimpleNamespace(
        llama_get_logits_ith=lambda ctx, i: ctypes.cast(llama._row, ctypes.POINTER(ctypes.c_float)),
        llama_vocab_fim_pre=lambda v: fim[0], llama_vocab_fim_suf=lambda v: fim[1],
        llama_vocab_fim_mid=lambda v: fim[2], llama_vocab_get_add_bos=lambda v: bos,
    )


def test_logprob_is_the_log_softmax_of_the_logits() -> None:
    logits = [1.0, 3.0, 2.0, 0.5, -1.0]
    llama = FakeLlama(logits)
    z = math.log(sum(math.exp(x) for x in logits))
    got = _logprob(fake_llama_cpp(llama), llama, 2, 3)
    assert got["token"] == "c" and got["bytes"] == [99]
    assert got["logprob"] == pytest.approx(2.0 - z, abs=1e-5)
    assert [t["token"] for t in got["top_logprobs"]] == ["b", "c", "a"]
    assert [t["logprob"] for t in got["top_logprobs"]] == pytest.approx([3.0 - z, 2.0 - z, 1.0 - z], abs=1e-5)
    assert _logprob(fake_llama_cpp(llama), llama, 3, 0) == {"token": "é", "logprob": pytest.approx(0.5 - z, abs=1e-5),
                                                           "bytes": [0xC3, 0xA9]}
    assert len(_logprob(fake_llama_cpp(llama), llama, 0, 20)["top_logprobs"]) == 5  # no more than the vocabulary


def test_logprobs_ride_on_the_text_they_became() -> None:
    pending = [{"token": "a"}, {"token": "b"}]
    assert _with_logprobs({"text": "ab"}, pending) == {"text": "ab", "logprobs": [{"token": "a"}, {"token": "b"}]}
    assert pending == [] and _with_logprobs({"text": "c"}, pending) == {"text": "c"}


def _record(template: str = "") -> Any:
    return SimpleNamespace(template=template, name=SimpleNamespace(short="m:latest"), model_path=Path("/x"))


def test_fill_in_the_middle_tokens() -> None:
    llama = FakeLlama([0.0])
    req = InferenceRequest(kind="generate", model="m", prompt="ab", suffix="c")
    got = _fill_in_middle(fake_llama_cpp(llama, (5, 6, 7), bos=True), llama, _record(), req)
    assert got == [1, 5, 100 + ord("a"), 100 + ord("b"), 6, 100 + ord("c"), 7]  # [BOS] PRE prompt SUF suffix MID
    with pytest.raises(BadRequestError, match=r"^m:latest does not support insert$"):
        _fill_in_middle(fake_llama_cpp(llama), llama, _record(), req)
    # a template that takes the suffix itself renders it instead
    assert _fill_in_middle(fake_llama_cpp(llama), llama, _record("<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>"),
                           req) is None


def test_shifting_drops_the_older_half_and_goes_on() -> None:
    windows: list[list[int]] = []

    def start(window: list[int]) -> Iterator[int]:
        windows.append(list(window))
        n = 100 + len(windows) * 10
        while True:
            yield n
            n += 1

    gen = _shifting(start, [1, 2, 3, 4, 5, 6], n_ctx=10, keep=2)
    got = [next(gen) for _ in range(9)]
    gen.close()
    assert got == [110, 111, 112, 113, 120, 121, 122, 123, 130]
    # full at 10: keep 2, drop the older half of the other 8, go on from the rest
    assert windows == [[1, 2, 3, 4, 5, 6], [1, 2, 110, 111, 112, 113], [1, 2, 120, 121, 122, 123]]


def test_every_agents_field_survives_the_wire() -> None:
    req = InferenceRequest(
        kind="chat", model="m", messages=[{"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "content": "2", "tool_call_id": "call_1", "tool_name": "f"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "f"}}, think="high", logprobs=True,
        top_logprobs=20, suffix="tail", shift=False, dimensions=8, raw=True)
    back = InferenceRequest.from_dict(json.loads(json.dumps(req.to_dict())))
    assert back == req
