#!/usr/bin/env bash
# Debian tools the integration tests drive for real: promtool and a Prometheus
# server (tests/integration/test_metrics.py) and headless Chromium for the
# dashboard (test_dashboard.py, through PyPI's playwright with executable_path),
# a distribution v2 registry for pull and push (test_registry.py), nftables
# for the chaos suite's partitions and stress-ng to load the CPU beside a run.
# Idempotent: installs only what is missing.
set -euo pipefail
need=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || need+=(prometheus)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v nft >/dev/null || need+=(nftables)  # the chaos suite's partitions, inside its own netns
command -v stress-ng >/dev/null || need+=(stress-ng)  # a busy CPU beside the suite (issue 10)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "apt-deps: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "apt-deps: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
