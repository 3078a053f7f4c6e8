"""Helpers for the system tier: the .deb installed in a Debian 12 booted by systemd-nspawn.

Each container boots from the cached debootstrap tree (scripts/rootfs.sh) through
an overlayfs mount, so the cached tree stays clean and every run starts fresh.
Commands run inside with `nsenter -a` into the container's PID 1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("OLLAMA_DISTRIBUTED_CACHE", Path.home() / ".cache/ollama-distributed"))
ROOTFS = Path(os.environ.get("OLLAMA_DISTRIBUTED_ROOTFS", CACHE / "rootfs"))
DIST = REPO / "dist"
UNIT = "ollama-distributed.service"
GUEST_ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
    "HOME=/root",
    "SYSTEMD_PAGER=",
]


def step(msg: str) -> None:
    """Mark a step so a failure reads like a story."""
    print(f"=== {msg}", flush=True)


def why_not_runnable() -> str | None:
    """The reason this machine cannot run the system tier, or None."""
    if not hasattr(os, "geteuid") or os.uname().sysname != "Linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, overlayfs mounts, apt-get install of host tools)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "needs a cgroup filesystem for systemd-nspawn"
    return None


class Guest:
    """A Debian 12 container booted with systemd as PID 1."""

    def __init__(self, name: str, *, netns: str | None = None, binds: dict[str, str] | None = None):
        self.name = name
        self.netns = netns
        self.binds = binds or {}
        self.dir = Path(tempfile.mkdtemp(prefix=f"guest-{name}-", dir=CACHE))
        self.merged = self.dir / "merged"
        self.log = self.dir / "nspawn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    # -- lifecycle -------------------------------------------------------------
    def boot(self, timeout: float = 240) -> None:  # liveness: a loaded machine boots slowly
        for d in ("upper", "work", "merged"):
            (self.dir / d).mkdir()
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={ROOTFS},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}",
             str(self.merged)],
            check=True,
        )
        (self.merged / "etc/hostname").write_text(self.name + "\n")
        cmd = ["systemd-nspawn", "-D", str(self.merged), "--register=no", "--keep-unit", "-b",
               "--console=passive", "--quiet", f"--machine={self.name}"]
        cmd.append(f"--network-namespace-path=/run/netns/{self.netns}" if self.netns
                   else "--private-network")
        cmd += [f"--bind-ro={src}:{dst}" for src, dst in self.binds.items()]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        self._find_leader(deadline)
        while True:
            if not Path(f"/proc/{self.leader}").exists():
                # nspawn's first child can be a helper that exits: the guest's init is the one
                self._find_leader(deadline)
            r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not boot: {state} {r.stderr}")
            time.sleep(0.2)
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            print(f"{self.name}: boot degraded: {failed}")

    def _find_leader(self, deadline: float) -> None:
        """The guest's init (its systemd, pid 1 inside): nsenter's target."""
        assert self.proc is not None
        self.leader = 0
        while not self.leader:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nspawn did not start {self.name}: {self.log.read_text()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                pids = children.read_text().split() if children.exists() else []
                inits = [int(p) for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "systemd"]
            except OSError:  # a child came and went while we looked
                inits = []
            if inits:
                self.leader = inits[0]
            else:
                time.sleep(0.1)

    def shutdown(self) -> None:
        if self.proc and self.proc.poll() is None:
            # nspawn turns SIGTERM into an orderly poweroff of the guest.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if os.path.ismount(self.merged):
            subprocess.run(["umount", "-l", str(self.merged)], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- commands inside ---------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i", *GUEST_ENV, *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                           check=False)
        if check and r.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {shlex.join(argv)} exited {r.returncode}\n"
                f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)  # type: ignore[arg-type]

    def read(self, path: str) -> str:
        return (self.merged / path.lstrip("/")).read_text()

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", f"cat > {shlex.quote(path)}", input=text)

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    # -- the unit ------------------------------------------------------------------
    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", UNIT, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_unit(self, pred: object, timeout: float, what: str, *props: str) -> dict[str, str]:
        props = props or ("ActiveState", "SubState", "Result", "NRestarts", "MainPID")
        deadline = time.monotonic() + timeout
        while True:
            state = self.show(*props)
            if pred(state):  # type: ignore[operator]
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"[{self.name}] timed out waiting for {what}: {state}\n"
                                     + self.journal(lines=40))
            time.sleep(0.3)

    def journal(self, *args: str, lines: int = 200) -> str:
        return self.run("journalctl", "-u", UNIT, "--no-pager", "-n", str(lines), *args,
                        check=False).stdout

    def wait_journal(self, text: str, *args: str, timeout: float = 15) -> str:
        """The unit's journal once it holds text (journald writes asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.journal(*args)
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"[{self.name}] {text!r} not in the journal:\n{log[-3000:]}")
            time.sleep(0.3)

    def journal_json(self, *args: str) -> list[dict[str, object]]:
        out = self.run("journalctl", "-u", UNIT, "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def curl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("curl", "-sS", "--max-time", str(int(timeout)), *args, check=check,
                        timeout=timeout + 10)
