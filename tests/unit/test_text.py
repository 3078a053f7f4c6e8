from __future__ import annotations

import pytest
from ollama_distributed.duration import parse_keep_alive
from ollama_distributed.engines.options import normalise
from ollama_distributed.engines.textstream import StopStream
from ollama_distributed.errors import BadRequestError


def feed_all(stops: list[str], pieces: list[bytes]) -> tuple[str, bool]:
    s = StopStream(stops)
    out = "".join(s.feed(p) for p in pieces)
    return out + s.flush(), s.stopped


def test_stop_sequence_split_across_tokens() -> None:
    assert feed_all(["END"], [b"hello E", b"N", b"D more"]) == ("hello ", True)
    assert feed_all(["END"], [b"hello E", b"NOUGH"]) == ("hello ENOUGH", False)


def test_utf8_split_across_tokens() -> None:
    snow = "☃".encode()
    assert feed_all([], [snow[:1], snow[1:2], snow[2:], b"!"]) == ("☃!", False)


def test_text_is_released_as_soon_as_it_cannot_be_a_stop() -> None:
    s = StopStream(["<|im_end|>"])
    assert s.feed(b"abc") == "abc"
    assert s.feed(b" <|im") == " "
    assert s.feed(b"_end|>") == ""
    assert s.stopped


@pytest.mark.parametrize("value,seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("300", 300.0), (300, 300.0), ("0", 0.0), (0, 0.0),
    ("-1", None), (-1, None), ("-1m", None), ("1.5s", 1.5), ("", 300.0), (None, 300.0),
])
def test_keep_alive(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["soon", "5 minutes", "m5", True])
def test_keep_alive_bad(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(bad)  # type: ignore[arg-type]


def test_options() -> None:
    assert normalise({"temperature": 0, "num_predict": 5.0, "stop": "x"}, {"top_k": 3}) == {
        "top_k": 3, "temperature": 0.0, "num_predict": 5, "stop": ["x"]}
    for bad, name in (({"num_predict": "5"}, "num_predict"), ({"top_k": 1.5}, "top_k"),
                      ({"stop": [1]}, "stop"), ({"penalize_newline": 1}, "penalize_newline")):
        with pytest.raises(BadRequestError, match=name):
            normalise(bad)
    # As Ollama: null is unset, an unknown option is ignored (LangChain sends both)
    assert normalise({"stop": None, "temperature": None, "top_k": 2, "temprature": 1}) == {"top_k": 2}
    with pytest.raises(BadRequestError, match="temprature"):
        normalise({"temprature": 1}, strict=True)  # a model's own parameters at create
    with pytest.raises(BadRequestError):
        normalise([1])
