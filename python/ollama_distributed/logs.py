"""Logging: one line per event on stderr.

Under systemd, when $JOURNAL_STREAM names the device and inode of stderr, each
line carries journald's `<N>` priority prefix (sd-daemon(3)), every line of a
traceback included, so journald files them at the right priority. Elsewhere the
lines are human-readable with timestamps.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import types

from . import env
from .security.redact import redact

# syslog priorities, as sd-daemon(3) prefixes expect them
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def stderr_is_journal() -> bool:
    value = env.get(env.JOURNAL_STREAM)
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """Prefix every physical line with `<N>`; journald adds its own timestamp."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if stderr_is_journal() else HumanFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    set_level(level)
    # An uncaught exception goes through logging too, so under journald its
    # traceback lines carry a priority like every other line.
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda a: _log_uncaught(a.exc_type, a.exc_value, a.exc_traceback)
    # aiohttp's access log is one line per request; keep it at debug.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException | None,
                  tb: types.TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc or exc_type(), tb)
        return
    logging.getLogger("ollama_distributed").critical("uncaught exception", exc_info=(exc_type, exc or exc_type(), tb))


def fatal(message: str) -> None:
    """An error line on stderr before (or without) logging: at priority 3 under journald."""
    prefix = f"<{_PRIORITY[logging.ERROR]}>" if stderr_is_journal() else ""
    sys.stderr.write("".join(f"{prefix}{line}\n" for line in redact(message).splitlines() or [""]))
    sys.stderr.flush()


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
