"""The child process that holds one model split across nodes (engines/split.py).

Run by the node as `python -m ollama_distributed.engines.split_worker
--parent PID`. It reads JSON lines on stdin and writes JSON lines on stdout,
each carrying the `id` of the call it answers:

- `{"op": "load", "spec": {...}}`: register the RPC servers on the tunnels'
  loopback ports (`ports`), load `model` from the store at `models_dir` with
  `n_gpu_layers` layers on those devices in proportion `tensor_split`;
  answers `{"loaded": true, "load_s", "n_ctx"}` or `{"error": {"status", "message"}}`.
- `{"op": "generate", "request": InferenceRequest.to_dict()}`: answers
  `{"chunk": ...}` lines (the engine's own chunks), then `{"end": true}` or
  `{"error": ...}`.
- `{"op": "cancel"}` with the id of a generate: it stops at its next token.

llama.cpp aborts this process when an RPC server it uses goes away; the node
sees the pipe close and fails the requests with a clear error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import EngineSection
from ..errors import OllamaDistributedError
from ..models.store import ModelRecord, Store
from . import ggml_rpc
from .base import CancelToken, InferenceRequest
from .llamacpp import LlamaCppEngine


class _Out:
    """stdout as a binary line writer (nothing else may print there)."""

    def __init__(self) -> None:
        self.buf = sys.stdout.buffer

    def write(self, b: bytes) -> None:
        self.buf.write(b)

    def flush(self) -> None:
        self.buf.flush()


class Worker:
    def __init__(self, out: _Out) -> None:
        self.out = out
        self.engine: LlamaCppEngine | None = None
        self.record: ModelRecord | None = None
        self.cancels: dict[int, CancelToken] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, msg: dict[str, Any]) -> None:
        self.out.write((json.dumps(msg) + "\n").encode())
        self.out.flush()

    def fail(self, cid: int, e: BaseException) -> None:
        status = e.status if isinstance(e, OllamaDistributedError) else 500
        message = e.message if isinstance(e, OllamaDistributedError) else f"{type(e).__name__}: {e}"
        self.send({"id": cid, "error": {"status": status, "message": message}})

    async def load(self, cid: int, spec: dict[str, Any]) -> None:
        for port in spec["ports"]:
            ggml_rpc.add_server(int(port))
        cfg = EngineSection(**spec["engine"])
        self.engine = LlamaCppEngine(cfg, evict_candidate=lambda names, n: None, is_idle=lambda m: True)
        self.engine.load_kwargs = {"n_gpu_layers": int(spec["n_gpu_layers"]),
                                   "tensor_split": [float(x) for x in spec["tensor_split"]]}
        self.record = Store(Path(spec["models_dir"])).get(spec["model"])
        await self.engine.start()
        options = {"num_ctx": spec["num_ctx"]} if spec.get("num_ctx") else {}
        t0 = time.perf_counter()
        await self.engine.load(InferenceRequest(kind="generate", model=spec["model"], options=options),
                               self.record)
        loaded = self.engine.loaded()
        self.send({"id": cid, "loaded": True, "load_s": time.perf_counter() - t0,
                   "n_ctx": loaded[0].context_length if loaded else 0})

    async def generate(self, cid: int, request: dict[str, Any]) -> None:
        if self.engine is None or self.record is None:
            raise RuntimeError("generate before load")
        cancel = self.cancels[cid] = CancelToken()
        try:
            req = InferenceRequest.from_dict(request)
            async for chunk in self.engine.generate(req, self.record, 0, cancel):
                self.send({"id": cid, "chunk": chunk})
            self.send({"id": cid, "end": True})
        finally:
            self.cancels.pop(cid, None)

    async def run_call(self, msg: dict[str, Any]) -> None:
        cid = int(msg.get("id", 0))
        try:
            if msg.get("op") == "load":
                await self.load(cid, msg["spec"])
            elif msg.get("op") == "generate":
                await self.generate(cid, msg["request"])
            else:
                raise ValueError(f"unknown op {msg.get('op')!r}")
        except Exception as e:  # answered to the node, which owns the request
            self.fail(cid, e)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            msg = json.loads(line)
            if msg.get("op") == "cancel":
                token = self.cancels.get(int(msg.get("id", 0)))
                if token is not None:
                    token.cancel()
                continue
            t = asyncio.create_task(self.run_call(msg))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        # stdin closed: the node is gone or stopped this model
        for token in self.cancels.values():
            token.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="holds a model split across nodes (run by the node)")
    p.add_argument("--parent", type=int, default=0, help="die when this process does")
    args = p.parse_args(argv)
    if args.parent:
        ggml_rpc._die_with_parent(args.parent)
    out = _Out()
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
    asyncio.run(Worker(out).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
