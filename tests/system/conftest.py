"""Fixtures for the system tier (see systemtier.py for the container driver)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from systemtier import DIST, REPO, ROOTFS, Guest, why_not_runnable


@pytest.fixture(scope="session")
def system_ready() -> None:
    """Skip when the machine truly cannot run the tier; else install host tools
    and make sure the cached rootfs exists."""
    reason = why_not_runnable()
    if reason:
        pytest.skip(f"system tier: {reason}")
    subprocess.run([str(REPO / "scripts/system-deps.sh")], check=True)
    t0 = time.monotonic()
    subprocess.run([str(REPO / "scripts/rootfs.sh"), str(ROOTFS)], check=True)
    print(f"rootfs ready in {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="session")
def packages(system_ready: None) -> dict[str, Path]:
    """The .deb and .rpm from `make package` (built or refreshed here, so that
    `pytest tests/system` alone also tests the current tree)."""
    t0 = time.monotonic()
    subprocess.run(["make", "-s", "-C", str(REPO), "package"], check=True)
    print(f"make package: {time.monotonic() - t0:.1f} s")
    debs = sorted(DIST.glob("ollama-distributed_*.deb"))
    rpms = sorted(DIST.glob("ollama-distributed-*.rpm"))
    assert len(debs) == 1 and len(rpms) == 1, f"expected one .deb and one .rpm in {DIST}"
    return {"deb": debs[0], "rpm": rpms[0]}


@pytest.fixture
def guest_factory(system_ready: None) -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def make(name: str, **kw: object) -> Guest:
        g = Guest(name, **kw)  # type: ignore[arg-type]
        guests.append(g)
        g.boot()
        return g

    yield make
    for g in guests:
        g.shutdown()
