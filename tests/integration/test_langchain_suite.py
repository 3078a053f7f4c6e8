"""LangChain's own `langchain-ollama` integration suite against a real node,
the model names substituted by the bundled model (about 10 minutes on 2 cores).

It needs a venv of its own (pytest < 9): `scripts/langchain-suite.sh` makes it
and prints `LANGCHAIN_OLLAMA_SUITE=<python>:<unpacked sdist>`; without that
variable the test is skipped. Every test that does not need a capable model
must pass; those that do are listed below with the reason."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ..conftest import MODEL, NodeProc

SUITE = os.environ.get("LANGCHAIN_OLLAMA_SUITE", "")

# test id (without its module path) -> why SmolLM2 135M, or this machine, cannot pass it
NEEDS_MORE: dict[str, str] = {
    "test_bind_runnables_as_tools": "the model must choose to call the tool (no tool_choice is sent)",
    "test_agent_loop[model0]": "the model must choose to call the tool",
    "test_agent_loop[model1]": "the model must choose to call the tool",
    "test_unicode_tool_call_integration": "the model must choose to call the tool",
    "test_json_mode": "the model must write the JSON object the prompt describes",
    "test_image_inputs": "a vision model, and an image fetched from the internet",
    "test_agent_loop[gpt-oss:20b-None]": "a reasoning model (gpt-oss:20b)",
    "test_agent_loop[gpt-oss:20b-v1]": "a reasoning model (gpt-oss:20b)",
    "test_tool_streaming[smollm2:135m]": "the model must choose to call the tool",
    "test_tool_astreaming[smollm2:135m]": "the model must choose to call the tool",
    "test_structured_output_deeply_nested[smollm2:135m]": "the model must fill a nested schema sensibly",
    "test_structured_output[function_calling]": "the model must choose to call the schema's tool",
}
# Files whose tests all need a reasoning model (deepseek-r1, gpt-oss): not run.
REASONING_ONLY = ["chat_models/test_chat_models_reasoning.py"]

pytestmark = pytest.mark.skipif(not SUITE, reason="LANGCHAIN_OLLAMA_SUITE not set (scripts/langchain-suite.sh)")


def test_langchain_ollama_integration_suite(node: NodeProc, tmp_path: Path) -> None:
    python, _, sdist = SUITE.partition(":")
    suite = tmp_path / "integration_tests"
    shutil.copytree(Path(sdist) / "tests" / "integration_tests", suite)
    for f in suite.rglob("*.py"):  # their default model names -> ours
        text = f.read_text()
        f.write_text(re.sub(r'"(llama3\.1|deepseek-r1:1\.5b)"', f'"{MODEL}"', text))
    for f in REASONING_ONLY:
        (suite / f).unlink()
    (tmp_path / "conftest.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OLLAMA_HOST")}
    env.update(OLLAMA_HOST=node.url, OLLAMA_TEST_MODEL=MODEL)
    deselect = [a for name in ("test__stream_no_reasoning", "test__astream_no_reasoning",
                               "test__stream_with_reasoning", "test__astream_with_reasoning")
                for a in ("--deselect", f"integration_tests/test_llms.py::{name}")]  # a reasoning model
    out = subprocess.run([python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
                          "integration_tests", *deselect], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    results = {name: outcome for outcome, name in re.findall(
        r"^(PASSED|FAILED|ERROR|XPASS|XFAIL|SKIPPED) \S*?::(?:\w+::)?(\S+)", out.stdout, re.M)}
    failed = {n for n, o in results.items() if o in ("FAILED", "ERROR")}
    unexpected = failed - set(NEEDS_MORE)
    assert not unexpected, f"failed beyond those that need a capable model: {sorted(unexpected)}\n{out.stdout[-20000:]}"
    passed = {n for n, o in results.items() if o == "PASSED"}
    assert {"test_embed_query", "test_embed_documents", "test_invoke", "test_stream[model0]",
            "test_tool_message_histories_string_content", "test_structured_output[pydantic]"} <= passed, out.stdout[-20000:]
    print(f"langchain-ollama: {len(passed)} passed; failing as expected without a capable model: "
          f"{sorted(failed)}")
