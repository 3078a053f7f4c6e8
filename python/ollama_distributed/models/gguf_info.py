"""What /api/show and /api/tags say about a GGUF file.

Written here rather than with gguf-py's GGUFReader: that reader materialises
every element of every array (a 49k-token vocabulary, its merges) as numpy
views, which took 2.2 s for the bundled 98 MB model and sat on the first
start's path to ready. This reads the header in one pass over an mmap, keeps
scalars and short arrays, and skips long arrays by their sizes (GGUF v2/v3,
little-endian, as llama.cpp writes it).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

# llama.cpp's LLAMA_FTYPE values, as Ollama names them in quantization_level.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
# GGUF value types: struct format of each fixed-size one.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY = 64  # longer arrays (vocabularies) are summarised as None, as Ollama does
# Bounds against a hostile or truncated file: no header is anywhere near these.
_MAX_COUNT = 1 << 24
_MAX_STRING = 1 << 24


class _Reader:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ValueError("truncated GGUF header")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if n > _MAX_STRING or self.pos + n > len(self.buf):
            raise ValueError("bad string length in GGUF header")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.take("Q")
        if n > _MAX_STRING:
            raise ValueError("bad string length in GGUF header")
        self.pos += n

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.take("I")
            count = self.take("Q")
            if count > _MAX_COUNT:
                raise ValueError("bad array length in GGUF header")
            if count <= _MAX_ARRAY:
                return [self.value(etype) for _ in range(count)]
            if etype in _SCALARS:
                self.pos += count * struct.calcsize("<" + _SCALARS[etype])
            elif etype == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ValueError(f"unknown GGUF value type {vtype}")


def _size_label(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}M"
    return str(n)


def read(path: Path) -> dict[str, Any]:
    """Summary of a GGUF file: family, parameter count, quantisation, metadata.

    Raises ValueError when the file is not GGUF or its header is malformed.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf)
            r.pos = 4
            version = r.take("I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = r.take("Q"), r.take("Q")
            if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
                raise ValueError("bad counts in GGUF header")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.take("I"))
            params = 0
            for _ in range(n_tensors):
                r.skip_string()
                n_dims = r.take("I")
                if n_dims > 8:
                    raise ValueError("bad tensor rank in GGUF header")
                elements = 1
                for _ in range(n_dims):
                    elements *= r.take("Q")
                r.take("I")  # type
                r.take("Q")  # offset
                params += elements
    arch = str(meta.get("general.architecture") or "unknown")
    meta["general.parameter_count"] = params
    ftype = meta.get("general.file_type")
    quant = _FILE_TYPES.get(ftype, f"type {ftype}") if isinstance(ftype, int) else "unknown"
    return {
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": _size_label(params),
        "quantization_level": quant,
        "context_length": meta.get(f"{arch}.context_length"),
        "embedding_length": meta.get(f"{arch}.embedding_length"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "model_info": meta,
    }
