"""What /api/show and /api/tags say about a GGUF file, read with gguf-py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# llama.cpp's LLAMA_FTYPE values, as Ollama names them in quantization_level.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
_MAX_ARRAY = 64  # arrays (vocabularies) are summarised, as Ollama does without verbose


def _value(field: Any) -> Any:
    from gguf import GGUFValueType

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(field.data) > _MAX_ARRAY:
            return None
        return [_scalar(field, i, types[-1]) for i in field.data]
    return _scalar(field, field.data[0], types[0])


def _scalar(field: Any, idx: int, vtype: Any) -> Any:
    from gguf import GGUFValueType

    part = field.parts[idx]
    if vtype == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    value = part.tolist()
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def _size_label(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}M"
    return str(n)


def read(path: Path) -> dict[str, Any]:
    """Summary of a GGUF file: family, parameter count, quantisation, metadata.

    Raises ValueError when the file is not GGUF.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = _value(field)
        except Exception:  # one odd field must not hide the rest
            logger.debug("unreadable GGUF field %s in %s", name, path, exc_info=True)
    arch = str(meta.get("general.architecture") or "unknown")
    params = 0
    for t in reader.tensors:
        params += int(t.n_elements)
    meta["general.parameter_count"] = params
    ftype = meta.get("general.file_type")
    quant = _FILE_TYPES.get(int(ftype), f"type {ftype}") if isinstance(ftype, int) else "unknown"
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
