"""Logging as an operator reads it: under journald (JOURNAL_STREAM names
stderr) every line carries a `<N>` priority prefix, traceback lines included;
elsewhere lines are human-readable with timestamps. The level comes from
--log-level or logging.level."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..conftest import CLI, free_port, start_node, wait_ready

PRIORITY = re.compile(r"^<[0-7]>")
HUMAN = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")


def journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_journald_mode_prefixes_every_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("logging: {level: debug}\n")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    err.touch()
    env = {**os.environ, "NO_COLOR": "1", "JOURNAL_STREAM": journal_stream(err), "HOME": str(tmp_path)}
    api, web = free_port(), free_port()
    with open(out, "wb") as o, open(err, "ab") as e:
        proc = subprocess.Popen([*CLI, "start", "--config", str(cfg), "--engine", "mock", "--data-dir",
                                 str(tmp_path / "data"), "--api-port", str(api), "--web-port", str(web),
                                 "--p2p-port", str(free_port())], stdout=o, stderr=e, env=env)
    try:
        from ..conftest import NodeProc

        node = NodeProc(proc, tmp_path / "data", api, web, 0, err)
        wait_ready(node)
        cfg.write_text("logging: {level: loud}\n")  # a bad value: the reload logs an error
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    lines = [line for line in err.read_text().splitlines() if line]
    assert lines, "nothing logged"
    assert all(PRIORITY.match(line) for line in lines), [x for x in lines if not PRIORITY.match(x)]
    assert any(line.startswith("<6>") and "registered default model" in line for line in lines), lines
    assert any(line.startswith("<3>") and "reload failed" in line and "logging.level" in line
               for line in lines), lines
    assert any(line.startswith("<7>") for line in lines), lines  # debug from the config file
    assert any(line.startswith("<6>") and "shutting down" in line for line in lines), lines
    assert not any(HUMAN.match(line[3:]) for line in lines)  # journald stamps lines itself
    assert "Node" in out.read_text()  # the services block stays on stdout


def test_journald_mode_prefixes_traceback_lines(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    err.touch()
    code = (
        "import logging\n"
        "from ollama_distributed import logs\n"
        "logs.setup('info')\n"
        "log = logging.getLogger('ollama_distributed.test')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    log.exception('handled failure')\n"
        "raise RuntimeError('boom')\n"
    )
    with open(err, "ab") as e:
        r = subprocess.run([sys.executable, "-c", code], stderr=e, check=False,
                           env={**os.environ, "JOURNAL_STREAM": journal_stream(err)})
    assert r.returncode == 1
    lines = err.read_text().splitlines()
    assert all(PRIORITY.match(line) for line in lines), lines
    assert "<3>ollama_distributed.test: handled failure" in lines
    assert "<3>Traceback (most recent call last):" in lines
    assert "<3>ZeroDivisionError: division by zero" in lines
    assert "<2>ollama_distributed: uncaught exception" in lines
    assert "<2>RuntimeError: boom" in lines


def test_human_mode_has_timestamps_and_honours_the_level(tmp_path: Path) -> None:
    # JOURNAL_STREAM naming some other file is not journald: human lines.
    other = tmp_path / "other"
    other.touch()
    n = start_node(tmp_path, "--engine", "mock", env={"JOURNAL_STREAM": journal_stream(other)})
    assert n.stop() == 0
    lines = [line for line in n.log().splitlines() if HUMAN.match(line)]
    assert any(" INFO " in line and "registered default model" in line for line in lines), n.log()
    assert not any(PRIORITY.match(line) for line in n.log().splitlines())
    assert not any(" DEBUG " in line for line in lines)

    (tmp_path / "q").mkdir()
    (tmp_path / "l").mkdir()
    quiet = start_node(tmp_path / "q", "--engine", "mock", "--log-level", "warning")
    assert quiet.stop() == 0
    assert "registered default model" not in quiet.log() and " INFO " not in quiet.log()

    loud = start_node(tmp_path / "l", "--engine", "mock", env={"OLLAMA_DISTRIBUTED_LOGGING_LEVEL": "debug"})
    assert loud.stop() == 0
    assert any(HUMAN.match(line) and " DEBUG " in line for line in loud.log().splitlines()), loud.log()
