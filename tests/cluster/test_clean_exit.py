"""A process that uses the cluster core and exits right after its last await
exits cleanly: no core thread reaches the interpreter while it finalizes
(pyo3-async-runtimes hands results over from blocking-pool threads; a thread
that gets the GIL from a finalizing interpreter aborts the process with
"Fatal Python error: PyGILState_Release")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

SCRIPT = r'''
import asyncio, hashlib, os, pathlib, socket, sys
from ollama_distributed.cluster import ClusterService

def port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

async def main(tmp):
    def svc(name, join=(), token=None):
        return ClusterService(node_id=name, data_dir=tmp / name, host="127.0.0.1", port=port(),
                              join=list(join), token=token, api_address="", failure_timeout=2.0)
    a = svc("a")
    await a.start()
    while a.status()["role"] != "leader":
        await asyncio.sleep(0.02)
    b = svc("b", [a.local_address()], a.join_token())
    await b.start()
    while b.status()["peers_connected"] < 1:
        await asyncio.sleep(0.02)
    data = os.urandom(1 << 20)
    hexd = hashlib.sha256(data).hexdigest()
    for n in (a, b):
        (tmp / n.node_id / "models" / "blobs").mkdir(parents=True, exist_ok=True)
        n.configure_blobs(tmp / n.node_id / "models")
    (tmp / "a" / "models" / "blobs" / f"sha256-{hexd}").write_bytes(data)
    await b.fetch_blob(["a"], f"sha256:{hexd}")
    await b.stop()
    await a.stop()

asyncio.run(main(pathlib.Path(sys.argv[1])))
'''


def test_exiting_right_after_the_core_answers_is_clean(tmp_path: Path) -> None:
    failures = []
    for i in range(12):
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / str(i))], capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0 or "Fatal Python error" in r.stderr:
            failures.append(f"run {i}: exit {r.returncode}: {r.stderr[-600:]}")
    assert not failures, "\n".join(failures)
