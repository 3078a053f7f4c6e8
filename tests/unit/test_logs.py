"""logs: priorities, the journal formatter on multi-line records, and the
JOURNAL_STREAM test against stderr's device and inode."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
from ollama_distributed import logs


@pytest.mark.parametrize(("level", "prio"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (5, 7), (25, 6), (45, 3),
])
def test_priority(level: int, prio: int) -> None:
    assert logs.priority(level) == prio


def test_journal_formatter_prefixes_every_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        rec = logging.LogRecord("x.y", logging.ERROR, __file__, 1, "first\nsecond", None, sys.exc_info())
    lines = logs.JournalFormatter().format(rec).splitlines()
    assert lines[0] == "<3>x.y: first" and lines[1] == "<3>second"
    assert "<3>Traceback (most recent call last):" in lines
    assert all(line.startswith("<3>") for line in lines)


def test_stderr_is_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "err"
    with open(f, "w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not logs.stderr_is_journal()
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not logs.stderr_is_journal()
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not logs.stderr_is_journal()
