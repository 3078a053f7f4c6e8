#!/usr/bin/env bash
# Debootstrap a Debian 12 tree for the system test tier into a cache folder
# outside the clone, once. It is reused read-only (tests boot an overlay on top),
# and rebuilt when missing or when the package list below changes.
#
# usage: scripts/rootfs.sh [DIR]   (default $HOME/.cache/ollama-distributed/rootfs)
set -euo pipefail
dir="${1:-${OLLAMA_DISTRIBUTED_ROOTFS:-$HOME/.cache/ollama-distributed/rootfs}}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Base for booting systemd, plus the .deb's Depends (packaging/nfpm.yaml), so
# `apt-get install ./ollama-distributed.deb` resolves them offline inside a
# container that has no network of its own. curl is for checks from inside.
packages=(systemd systemd-sysv dbus iproute2 ca-certificates procps curl
          python3 libgomp1 libstdc++6 libgcc-s1)
stamp="bookworm minbase ${packages[*]}"

# Concurrent runs (two clones, or CI beside a developer) build it once.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [[ -f "$dir/.rootfs-stamp" && "$(cat "$dir/.rootfs-stamp")" == "$stamp" ]]; then
  exit 0
fi
"$(dirname "$0")/system-deps.sh"
echo "rootfs: debootstrapping bookworm into $dir (about 3 minutes, cached)" >&2
tmp="$dir.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$(dirname "$dir")"
include=$(IFS=,; echo "${packages[*]}")
debootstrap --variant=minbase --include="$include" bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  tail -40 "$tmp.log" >&2; rm -f "$tmp.log"; exit 1; }
rm -f "$tmp.log"

# Make it a quiet, fast-booting guest: no getty on the nspawn console, no
# timers that wake apt, and a fixed hostname.
echo ollama-ds > "$tmp/etc/hostname"
: > "$tmp/etc/machine-id"
chroot "$tmp" systemctl mask -q console-getty.service getty@.service \
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
  systemd-timesyncd.service 2>/dev/null || true
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
  > "$tmp/etc/apt/apt.conf.d/90ollama-ds-norecommends"
chroot "$tmp" apt-get clean
echo "$stamp" > "$tmp/.rootfs-stamp"

rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "rootfs: ready in $dir ($(du -sh "$dir" | cut -f1))" >&2
