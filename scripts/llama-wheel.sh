#!/usr/bin/env bash
# Build llama-cpp-python once into a wheel cache outside the clone (5-6 min on
# 2 cores), then every venv installs from the cache in seconds.
# GGML_NATIVE=OFF: the wheel also goes into packages that run on other CPUs.
set -euo pipefail
version="$1"; wheels="$2"; python="${3:-python3}"
mkdir -p "$wheels"
if ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  exit 0
fi
echo "building llama-cpp-python $version (about 6 minutes on 2 cores, cached in $wheels)" >&2
CMAKE_ARGS="-DGGML_NATIVE=OFF" "$python" -m pip wheel --no-deps -w "$wheels" "llama-cpp-python==$version"
