"""The CLI's way to the node's local admin socket (`<data dir>/admin.sock`,
api/admin.py): HTTP over a unix socket, stdlib only. Whoever may open the
socket (the node's user, or root) is the node's operator; no key is needed."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

import click

from .. import config as cfgmod
from ..errors import ConfigError

SOCKET = "admin.sock"
SYSTEM_DATA_DIR = Path("/var/lib/ollama-distributed")  # systemd's StateDirectory


class AdminError(click.ClickException):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.socket_path)
        self.sock = s


def data_dirs(explicit: Path | None) -> list[Path]:
    """Where to look for a node: --data-dir, else the data dir the config
    names (or the user's default), then systemd's."""
    if explicit is not None:
        return [explicit.expanduser()]
    out: list[Path] = []
    try:
        out.append(cfgmod.load().data_dir())
    except ConfigError:
        out.append(cfgmod.Config().data_dir())
    if SYSTEM_DATA_DIR not in out:
        out.append(SYSTEM_DATA_DIR)
    return out


def find_socket(dirs: list[Path]) -> Path | None:
    for d in dirs:
        path = d / SOCKET
        if path.is_socket():
            return path
    return None


def request(path: Path, method: str, url: str, body: Any = None, timeout: float = 30.0) -> Any:
    """One request to the admin socket at `path`; AdminError with the node's message."""
    conn = _UnixConnection(path, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, url, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except PermissionError:
        raise AdminError(f"no permission to open {path}: run this as the node's user (e.g. `sudo -u "
                         "ollama-distributed ...`) or as root") from None
    except (ConnectionRefusedError, FileNotFoundError):
        raise AdminError(f"the node is not running at {path} (stale socket); start it, or pass "
                         "--data-dir to work on its files while it is stopped") from None
    except OSError as e:
        raise AdminError(f"cannot talk to the node at {path}: {e}") from None
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError:
        data = None
    if resp.status >= 400:
        msg = data.get("error") if isinstance(data, dict) else None
        raise AdminError(str(msg or f"{resp.status} {resp.reason}"), status=resp.status)
    return data
