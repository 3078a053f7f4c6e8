from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from ollama_distributed.models import gguf_info
from ollama_distributed.models.catalog import find_default_gguf


def test_reads_the_bundled_model() -> None:
    gguf = find_default_gguf()
    assert gguf is not None
    info = gguf_info.read(gguf)
    assert (info["family"], info["parameter_size"], info["quantization_level"]) == ("llama", "135M", "Q4_1")
    assert info["embedding_length"] == 576
    meta = info["model_info"]
    assert meta["tokenizer.ggml.tokens"] is None  # long arrays are summarised
    assert meta["general.parameter_count"] > 100_000_000
    assert "<|im_start|>" in info["chat_template"]


def test_truncated_and_hostile_headers_are_value_errors(tmp_path: Path) -> None:
    gguf = find_default_gguf()
    assert gguf is not None
    head = gguf.read_bytes()[:4096]
    bad = tmp_path / "bad.gguf"
    for blob in (head[:20], head[:2000],
                 b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 1 << 60),
                 b"GGUF" + struct.pack("<I", 99), b"NOPE" + head[4:]):
        bad.write_bytes(blob)
        with pytest.raises(ValueError):
            gguf_info.read(bad)
    rng = random.Random(7)
    for _ in range(200):  # random garbage after the magic never escapes as another error
        bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + rng.randbytes(rng.randrange(0, 300)))
        with pytest.raises(ValueError):
            gguf_info.read(bad)
