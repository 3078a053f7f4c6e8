"""The node's ggml RPC server (`engine.rpc_server: true`), supervised.

It offers this machine's CPU backend to a model split across nodes: a child
process (engines/ggml_rpc.py) listening on 127.0.0.1 only, with the memory
budget `engine.rpc_memory_mib` advertised to the cluster. The child is
restarted when it exits; one that keeps dying at once ends the supervised task,
so the node reports itself degraded (supervise.py) instead of advertising a
server that is not there.

Peers reach the port only through the cluster core's RPC tunnel (a QUIC
stream on the pair's mTLS connection, rust/tunnel/): `on_port` tells the core
where to bridge tunnels while the child serves, and None when it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

from ..config import EngineSection
from ..errors import ConfigError
from . import ggml_rpc

logger = logging.getLogger(__name__)

# How long the child may take to listen (it loads ggml's libraries first; on a
# loaded 2-core machine that is a few seconds).
READY_TIMEOUT_S = 60.0
# A child that exits without ever listening (port taken, libraries missing)
# fails the same way next time: after this many in a row the task gives up.
FAST_FAILURES = 3
STOP_GRACE_S = 5.0


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ggml_rpc.HOST, 0))
        return int(s.getsockname()[1])


class RpcServer:
    """One child process serving ggml RPC on 127.0.0.1:`port`."""

    def __init__(self, cfg: EngineSection) -> None:
        self.cfg = cfg
        self.port = cfg.rpc_port or 0
        self.ready = False
        self.restarts = 0
        self._listened = False
        self._proc: asyncio.subprocess.Process | None = None
        # told the port while the child serves, None when it stops (node.py
        # points it at the cluster core's tunnel endpoint)
        self.on_port: Callable[[int | None], None] | None = None

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if self.on_port is not None:
            try:
                self.on_port(self.port if ready else None)
            except Exception:  # the cluster core not started or stopped: nothing to tell
                logger.debug("could not tell the cluster core the RPC port", exc_info=True)

    def check(self) -> None:
        """Raise ConfigError at start when this machine cannot serve RPC."""
        why = ggml_rpc.available()
        if why is not None:
            raise ConfigError(f"engine.rpc_server is true but {why}")

    def memory_mib(self) -> int:
        """The budget advertised: engine.rpc_memory_mib, else engine.max_model_memory_mib,
        else the memory available now."""
        return (self.cfg.rpc_memory_mib or self.cfg.max_model_memory_mib
                or int(psutil.virtual_memory().available // (1024 * 1024)))

    def advert_fields(self) -> dict[str, Any]:
        return {"rpc_ready": self.ready, "rpc_memory_mib": self.memory_mib() if self.ready else 0}

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "ready": self.ready, "address": ggml_rpc.endpoint(self.port),
                "memory_mib": self.memory_mib(), "restarts": self.restarts,
                "pid": self._proc.pid if self._proc is not None else None}

    async def run(self) -> None:
        """Keep the child running until cancelled (the node stops)."""
        fast = 0
        try:
            while True:
                code = await self._run_once()
                self.restarts += 1
                fast = 0 if self._listened else fast + 1
                if fast >= FAST_FAILURES:
                    raise RuntimeError(f"the RPC server on {ggml_rpc.endpoint(self.port)} exited "
                                       f"{fast} times in a row without serving (last exit code {code}); "
                                       "see the log lines above (port taken? set engine.rpc_port)")
                logger.warning("the RPC server exited (code %s); starting it again", code)
                await asyncio.sleep(min(30.0, 2.0 ** fast))
        finally:
            await self._kill()

    async def _run_once(self) -> int:
        self._listened = False
        if not self.cfg.rpc_port:
            self.port = free_loopback_port()
        threads = self.cfg.threads or (os.cpu_count() or 1)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ollama_distributed.engines.ggml_rpc", "--port", str(self.port),
            "--threads", str(threads), "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        logs = asyncio.create_task(self._relay(self._proc))
        try:
            if await self._wait_listening(self._proc):
                self._listened = True
                self._set_ready(True)
                logger.info("RPC server: serving this node's CPU backend on %s (loopback only), "
                            "%d MiB advertised", ggml_rpc.endpoint(self.port), self.memory_mib())
            return await self._proc.wait()
        finally:
            self._set_ready(False)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(logs, 2.0)
            logs.cancel()

    async def _wait_listening(self, proc: asyncio.subprocess.Process) -> bool:
        """Whether the child listens, seen in the kernel's socket table rather
        than by connecting (the server serves one client at a time, and a
        probe would be one)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and proc.returncode is None:
            if await asyncio.to_thread(self._listening, proc.pid):
                return True
            await asyncio.sleep(0.1)
        if proc.returncode is None:
            logger.error("the RPC server did not listen on %s within %.0f s; stopping it",
                         ggml_rpc.endpoint(self.port), READY_TIMEOUT_S)
            proc.terminate()
        return False

    def _listening(self, pid: int) -> bool:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.Error, OSError):
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                   for c in conns)

    async def _relay(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            logger.info("rpc-server: %s", line.decode(errors="replace").rstrip())

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        self._set_ready(False)
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
