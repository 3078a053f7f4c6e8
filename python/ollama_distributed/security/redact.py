"""Secrets never reach a log line or `config show`: join tokens, API keys,
bearer credentials, and the literal values of api.auth_tokens and p2p.token
(registered with `add_secret` when the node starts)."""

from __future__ import annotations

import re

PATTERNS = (
    (re.compile(r"OD1:[0-9a-fA-F]{64}:[^\s\"',;]+"), "OD1:<redacted>"),
    (re.compile(r"odk_[A-Za-z0-9_-]{8,}"), "odk_<redacted>"),
    (re.compile(r"(?i)(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 <redacted>"),
)
_literals: set[str] = set()


def add_secret(value: str) -> None:
    """Hide this exact value wherever it would be printed (short values are
    left alone: replacing every 'a' would ruin the log, not protect a secret)."""
    if value and len(value) >= 4:
        _literals.add(value)


def redact(text: str) -> str:
    for pattern, repl in PATTERNS:
        text = pattern.sub(repl, text)
    for value in _literals:
        if value in text:
            text = text.replace(value, "<redacted>")
    return text
