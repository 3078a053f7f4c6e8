#!/usr/bin/env bash
# LangChain's own langchain-ollama integration suite needs pytest < 9 and
# pytest-asyncio < 1, which the project's venv does not have: it gets a venv
# of its own, and the suite comes from the package's sdist (the wheel has no
# tests). Prints the value for LANGCHAIN_OLLAMA_SUITE, which
# tests/integration/test_langchain_suite.py reads.
set -euo pipefail
dir="${1:-$HOME/.cache/ollama-distributed/langchain-suite}"
python="${2:-python3}"
version=1.1.0
if [ ! -x "$dir/venv/bin/python" ]; then
  "$python" -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q "langchain-ollama==$version" "langchain-tests==1.1.6" "pytest<9" "pytest-asyncio<1"
fi
if [ ! -d "$dir/langchain_ollama-$version/tests/integration_tests" ]; then
  "$dir/venv/bin/pip" download -q --no-deps --no-binary :all: "langchain-ollama==$version" -d "$dir"
  tar -xzf "$dir/langchain_ollama-$version.tar.gz" -C "$dir"
fi
echo "LANGCHAIN_OLLAMA_SUITE=$dir/venv/bin/python:$dir/langchain_ollama-$version"
