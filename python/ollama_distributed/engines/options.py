"""Ollama's request options: checked once, with Ollama's defaults."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import BadRequestError

logger = logging.getLogger(__name__)

# name -> (type, default). Defaults are Ollama's.
SAMPLING: dict[str, tuple[type, Any]] = {
    "temperature": (float, 0.8),
    "top_p": (float, 0.9),
    "top_k": (int, 40),
    "min_p": (float, 0.0),
    "typical_p": (float, 1.0),
    "repeat_penalty": (float, 1.1),
    "repeat_last_n": (int, 64),
    "presence_penalty": (float, 0.0),
    "frequency_penalty": (float, 0.0),
    "seed": (int, -1),
    "num_predict": (int, -1),
    "num_ctx": (int, 0),
    "num_batch": (int, 512),
    "num_thread": (int, 0),
    "num_keep": (int, 4),
    "mirostat": (int, 0),
    "mirostat_tau": (float, 5.0),
    "mirostat_eta": (float, 0.1),
    "penalize_newline": (bool, True),
    "tfs_z": (float, 1.0),
    "num_gpu": (int, -1),
    "main_gpu": (int, 0),
    "use_mmap": (bool, True),
    "use_mlock": (bool, False),
    "numa": (bool, False),
    "low_vram": (bool, False),
    "vocab_only": (bool, False),
}


def normalise(options: Any, model_params: dict[str, Any] | None = None,
              strict: bool = False) -> dict[str, Any]:
    """Model parameters (from its Modelfile/create) overlaid by request options.

    As Ollama reads them: a `null` option is unset (LangChain sends every unset
    one as null), an unknown option is ignored with a debug log, and a known
    option of the wrong type is a 400 naming it. `strict` (a model's own
    parameters at create time) refuses unknown names too, so a typo in a
    Modelfile never passes silently.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequestError("options must be an object")
    merged: dict[str, Any] = {}
    for source in (model_params or {}, options):
        for key, value in source.items():
            if value is None:
                continue
            if key == "stop":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                    raise BadRequestError("option stop must be a string or a list of strings")
                merged["stop"] = list(value)
                continue
            spec = SAMPLING.get(key)
            if spec is None:
                if strict:
                    raise BadRequestError(f"invalid option provided: {key}")
                logger.debug("ignoring unknown option %r", key)
                continue
            tp = spec[0]
            if tp is bool:
                if not isinstance(value, bool):
                    raise BadRequestError(f"option {key} must be a boolean")
            elif tp is int:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not value.is_integer()
                ):
                    raise BadRequestError(f"option {key} must be an integer")
                value = int(value)
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise BadRequestError(f"option {key} must be a number")
                value = float(value)
            merged[key] = value
    for key, low in LOWEST.items():
        if key in merged and merged[key] < low:
            raise BadRequestError(f"option {key} must be {low} or more, got {merged[key]}")
    return merged


# Values below these mean nothing to llama.cpp, or worse: num_ctx 0 is the
# default, num_predict -1 no limit and -2 fill the context, num_keep -1 all.
LOWEST: dict[str, int] = {"num_ctx": 0, "num_predict": -2, "num_keep": -1, "num_batch": 0, "num_thread": 0}


def get(opts: dict[str, Any], key: str) -> Any:
    return opts[key] if key in opts else SAMPLING[key][1]
