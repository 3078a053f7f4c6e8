"""The CLI against a real node: version, models, run (one-shot and REPL), config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from ..conftest import CLI, MODEL, NodeProc


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, input=input,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})


def test_help_lists_commands() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("start", "models", "run", "config", "version"):
        assert cmd in r.stdout
    assert cli("start", "--help").returncode == 0
    assert "--join" in cli("start", "--help").stdout


def test_version(node: NodeProc) -> None:
    r = cli("version", "--json", "--api", node.url)
    info = json.loads(r.stdout)
    assert info["node"] == info["cli"] and info["core"]


def test_models_commands(node: NodeProc) -> None:
    listed = json.loads(cli("models", "list", "--json", "--api", node.url).stdout)
    assert MODEL in [m["name"] for m in listed["models"]]
    table = cli("models", "list", "--api", node.url).stdout
    assert table.splitlines()[0].split()[:2] == ["NAME", "ID"] and MODEL in table
    shown = cli("models", "show", MODEL, "--api", node.url).stdout
    assert "llama" in shown and "Q4_1" in shown
    r = cli("models", "create", "cli-made", "--from", MODEL, "--system", "Be brief.", "-p", "temperature=0.3",
            "--api", node.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "success"
    assert cli("models", "cp", "cli-made", "cli-copy", "--api", node.url).returncode == 0
    show = json.loads(cli("models", "show", "cli-copy", "--json", "--api", node.url).stdout)
    assert "temperature" in show["parameters"]
    assert cli("models", "rm", "cli-made", "cli-copy", "--api", node.url).returncode == 0
    names = [m["name"] for m in json.loads(cli("models", "list", "--json", "--api", node.url).stdout)["models"]]
    assert "cli-made:latest" not in names
    r = cli("models", "show", "cli-made", "--api", node.url)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = cli("models", "pull", "127.0.0.1:1/library/nothing", "--api", node.url)
    assert r.returncode == 1 and "cannot reach registry 127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr


def test_models_create_from_file_uploads(node: NodeProc, tmp_path: Path) -> None:
    blob = next((node.data_dir / "models" / "blobs").glob("sha256-b179*"))
    r = cli("models", "create", "from-file", "--file", str(blob), "--api", node.url)
    assert r.returncode == 0, r.stderr
    assert "using existing blob" in r.stderr  # already in the store: no second upload
    assert cli("models", "rm", "from-file", "--api", node.url).returncode == 0


def test_run_one_shot_streams(node: NodeProc) -> None:
    r = cli("run", MODEL, "Say", "hi", "--num-predict", "6", "--seed", "1", "--api", node.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    piped = cli("run", MODEL, "--num-predict", "6", "--seed", "1", "--api", node.url, input="Say hi")
    assert piped.stdout == r.stdout


def test_run_repl(node: NodeProc) -> None:
    child = pexpect.spawn(sys.executable, ["-m", "ollama_distributed.cli.main", "run", MODEL,
                                           "--num-predict", "5", "--api", node.url],
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=120)
    child.expect_exact(">>> ")
    child.sendline("/?")
    child.expect_exact("/bye")
    child.expect_exact(">>> ")
    child.sendline("Hello there")
    child.expect_exact(">>> ")
    answer = child.before
    assert answer.replace("Hello there", "").strip()
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_unreachable_node_is_a_clear_error() -> None:
    r = cli("models", "list", "--api", "http://127.0.0.1:9")
    assert r.returncode == 2
    assert "cannot reach the node at http://127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr


def test_config_init_validate_show(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    assert cli("config", "init", "--path", str(path)).returncode == 0
    assert cli("config", "init", "--path", str(path)).returncode == 1  # no silent overwrite
    r = cli("config", "validate", str(path))
    assert r.returncode == 0 and "valid" in r.stdout
    path.write_text("api:\n  port: eighty\n")
    r = cli("config", "validate", str(path))
    assert r.returncode == 1 and "api.port: expected an integer" in r.stderr and str(path) in r.stderr
    path.write_text("api:\n  port: 9999\n")
    shown = json.loads(cli("config", "show", "--config", str(path), "--json",
                           env={"OLLAMA_DISTRIBUTED_WEB_PORT": "7777"}).stdout)
    assert shown["api"]["port"] == 9999 and shown["web"]["port"] == 7777 and shown["source"] == str(path)


def test_start_with_a_bad_config_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("engine:\n  kind: warp-drive\n")
    r = cli("start", "--config", str(path), "--data-dir", str(tmp_path / "d"), timeout=30)
    assert r.returncode == 78
    assert "engine.kind" in r.stderr and str(path) in r.stderr




def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("start", "--data-dir", str(blocker / "sub"), "--api-port", "0", timeout=30)
    assert r.returncode == 78
    assert "cannot create the data dir" in r.stderr and "node.data_dir" in r.stderr


@pytest.mark.parametrize("bad", ["http://exa mple:80", "ftp://x", "http://[::1", "http://h:99999", ""])
def test_malformed_api_url_is_a_clear_error(bad: str) -> None:
    for args in (("models", "list"), ("run", MODEL, "hi"), ("version",)):
        r = cli(*args, "--api", bad)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        if args != ("version",):  # version prints what it can without a node
            assert r.returncode == 2 and "not a usable URL" in r.stderr, (args, r.stderr)


def test_fatal_errors_are_priority_3_under_journald(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("api:\n  prot: 1\n")
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        r = subprocess.run([*CLI, "start", "--config", str(path)], stderr=f, stdout=subprocess.DEVNULL,
                           env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, timeout=30)
    assert r.returncode == 78
    lines = err.read_text().splitlines()
    assert lines and all(line.startswith("<3>") for line in lines)
    assert "api.prot" in lines[0]
