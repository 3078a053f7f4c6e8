"""ggml's RPC backend through ctypes, from the libraries llama-cpp-python ships.

Two sides of one protocol (llama.cpp's ggml/include/ggml-rpc.h):

- serving: `serve()` exposes this machine's CPU backend on a loopback TCP
  port with `ggml_backend_rpc_start_server`. That call blocks for the life of
  the server and has no stop function, so it runs as the main thread of a
  child process of its own (`python -m ollama_distributed.engines.ggml_rpc`,
  supervised by engines/rpc.py), which a signal ends. The child also keeps a
  crash of this "proof of concept" server (llama.cpp's words) out of the node.
- using: `add_server()` registers a running server's devices in this
  process's ggml device registry, so a model loaded afterwards with
  `n_gpu_layers > 0` puts those layers on the RPC device(s) (llama.cpp puts
  RPC devices first and keeps the rest on the local CPU). Registration is
  process-wide and cannot be undone: a process that registers a server must
  not load models without it afterwards.

The host is always 127.0.0.1: llama.cpp's RPC server authenticates nobody and
trusts every message, so it is never bound on another address. Peers will
reach it only through the cluster's mutual-TLS QUIC links (issue 16).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import EngineError

HOST = "127.0.0.1"  # by design; see the module docstring
_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU


def lib_dir() -> Path:
    """llama-cpp-python's directory of shared libraries (llama_cpp/lib)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise EngineError("llama-cpp-python is not installed: the RPC backend needs its libraries")
    return Path(spec.origin).parent / "lib"


def _load(name: str) -> ctypes.CDLL:
    path = lib_dir() / name
    if not path.exists():
        raise EngineError(f"{path} is missing: this llama-cpp-python was built without GGML_RPC=ON "
                          "(rebuild it with scripts/llama-wheel.sh)")
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (device registry; dlsym also finds libggml-base's symbols) and libggml-rpc."""
    ggml = _load("libggml.so")
    rpc = _load("libggml-rpc.so")
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.restype = None
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_device_register.restype = None
    ggml.ggml_backend_device_register.argtypes = [ctypes.c_void_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    return ggml, rpc


def available() -> str | None:
    """None when the RPC backend can be used here, else why not."""
    try:
        _libs()
    except (EngineError, OSError, AttributeError) as e:
        return str(e)
    return None


def endpoint(port: int) -> str:
    return f"{HOST}:{port}"


def add_server(port: int) -> list[str]:
    """Register the devices of the RPC server on 127.0.0.1:`port` in this
    process; their names. Raises EngineError when it cannot be reached.

    llama.cpp's RPC client aborts the whole process (GGML_ABORT) when a server
    it uses cannot be reached or drops the connection, so the server is tried
    here first; a server that dies later still takes the loading process down
    with it, which is why split loads will run where that is survivable."""
    try:
        socket.create_connection((HOST, port), timeout=5).close()
    except OSError as e:
        raise EngineError(f"the RPC server at {endpoint(port)} cannot be reached: {e}") from None
    ggml, rpc = _libs()
    reg = rpc.ggml_backend_rpc_add_server(endpoint(port).encode())
    if not reg:
        raise EngineError(f"the RPC server at {endpoint(port)} cannot be reached")
    names = []
    for i in range(ggml.ggml_backend_reg_dev_count(reg)):
        dev = ggml.ggml_backend_reg_dev_get(reg, i)
        ggml.ggml_backend_device_register(dev)
        names.append(ggml.ggml_backend_dev_name(dev).decode(errors="replace"))
    if not names:
        raise EngineError(f"the RPC server at {endpoint(port)} offers no device")
    return names


def serve(port: int, threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU backend on 127.0.0.1:`port`; returns only when
    the server fails to start (the port taken) or stops accepting."""
    ggml, rpc = _libs()
    cpu = ggml.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
    if not cpu:
        raise EngineError("ggml has no CPU device")
    devices = (ctypes.c_void_p * 1)(cpu)
    rpc.ggml_backend_rpc_start_server(endpoint(port).encode(), cache_dir.encode() if cache_dir else None,
                                      threads, 1, devices)


def _die_with_parent(parent: int) -> None:
    """The server must not outlive the node (a kill -9 of the node included)."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ggml RPC server on 127.0.0.1 (run by the node)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--parent", type=int, default=0, help="die when this process does")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error("--port: expected 1-65535")
    if args.parent:
        _die_with_parent(args.parent)
    try:
        serve(args.port, max(1, args.threads), args.cache_dir)
    except EngineError as e:
        print(f"rpc server: {e}", file=sys.stderr)
        return 2
    print(f"rpc server: stopped serving {endpoint(args.port)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
