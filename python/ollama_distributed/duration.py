"""Ollama's keep_alive values: "5m", "1h30m", "300" or 300 (seconds), "-1", "0"."""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: str | int | float | None, default: float = 300.0) -> float | None:
    """Seconds to keep a model loaded; None means forever, 0 means unload now."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '5m', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            pos, total = 0, 0.0
            for m in _PART.finditer(body):
                if m.start() != pos:
                    break
                total += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(body) or not body:
                raise ValueError(f"expected a duration like '5m', '1h', '300' or '-1', got {value!r}") from None
            seconds = sign * total
    if seconds < 0:
        return None
    return seconds
