#!/usr/bin/env bash
# Build llama-cpp-python once into a wheel cache outside the clone, then every
# venv installs from the cache in seconds. Prints the directory that holds the
# wheel on stdout (for `pip install --find-links`).
#
# The wheel lands in a subdirectory named after the version and a hash of the
# CMake flags, so a wheel cached under other flags (an older one without RPC)
# is never reused: changing LLAMA_CMAKE_ARGS below changes the directory.
#
# Flags:
#   GGML_NATIVE=OFF  the wheel also goes into packages that run on other CPUs.
#   GGML_RPC=ON      libggml-rpc: a node serves its CPU backend to a split
#                    model (engines/rpc.py) and loads models across RPC parts.
#   LLAVA_BUILD=OFF  llama-cpp-python's multimodal library (mtmd): never loaded
#                    here (llama_cpp imports it lazily, only for vision chat
#                    handlers); 49 of the 178 compile units of a cold build.
#   (llama.cpp's common library is still compiled, unused: llama-cpp-python's
#   CMakeLists forces LLAMA_BUILD_COMMON on.)
#   LLAMA_BUILD_{TESTS,TOOLS,EXAMPLES,SERVER}=OFF: off already when llama.cpp
#                    is a subdirectory, said here so that stays true.
# usage: llama-wheel.sh VERSION WHEEL_CACHE [PYTHON]
set -euo pipefail
version="$1"; wheels="$2"; python="${3:-python3}"
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_RPC=ON -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_SERVER=OFF"
key=$(printf '%s\n%s\n' "$version" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
dir="$wheels/$version-$key"
mkdir -p "$dir"
if ! ls "$dir"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version with $LLAMA_CMAKE_ARGS" >&2
  echo "(129 compile units, 11 CPU-minutes; cached in $dir)" >&2
  # --no-cache-dir: pip's own wheel cache is keyed by the sdist, not by
  # CMAKE_ARGS, and would hand back a wheel built with other flags.
  tmp=$(mktemp -d "$dir/.build-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$python" -m pip wheel --no-cache-dir --no-deps \
    -w "$tmp" "llama-cpp-python==$version" >&2
  # The rename is atomic: a concurrent `make` never sees half a wheel.
  mv "$tmp"/llama_cpp_python-"$version"-*.whl "$dir"/
fi
echo "$dir"
