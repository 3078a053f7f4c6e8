"""A small synchronous HTTP client for the CLI (stdlib only: the CLI must
start fast and print clear errors, not tracebacks)."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import click

from .. import env

DEFAULT_API = "http://127.0.0.1:8080"
KEY_HINT = (f"{env.API_TOKEN}=<an API key (`ollama-distributed keys create NAME` on the node) "
            "or one of its api.auth_tokens>")


def default_api() -> str:
    return env.get(env.API) or DEFAULT_API


class ApiError(click.ClickException):
    """A failure talking to the node; `exit_code` 2 means unreachable."""

    def __init__(self, message: str, exit_code: int = 1, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click keeps it per class
        self.status = status


def checked_api(api: str) -> str:
    """The --api URL, or a clear error (exit 2) when it cannot be a node's URL."""
    url = api.strip()
    if url and "://" not in url:
        url = "http://" + url
    problem = ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  raises ValueError when out of range
    except ValueError as e:
        problem = str(e)
    else:
        if parts.scheme not in ("http", "https"):
            problem = f"the scheme must be http or https, not {parts.scheme or 'nothing'!r}"
        elif not parts.hostname:
            problem = "it names no host"
        elif any(c.isspace() or ord(c) < 32 for c in url):
            problem = "it contains spaces or control characters"
    if problem:
        raise ApiError(f"--api {api!r} is not a usable URL: {problem}; give the node's API URL, "
                       "e.g. http://127.0.0.1:8080", exit_code=2)
    return url


class Client:
    def __init__(self, base: str, timeout: float = 10.0, token: str | None = None) -> None:
        self.base = checked_api(base).rstrip("/")
        self.timeout = timeout
        self.token = token if token is not None else env.get(env.API_TOKEN)

    def _request(self, method: str, path: str, body: Any = None, data: bytes | None = None,
                 timeout: float | None = None, headers: dict[str, str] | None = None) -> Any:
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            msg = raw.decode("utf-8", "replace").strip()
            try:
                parsed = json.loads(raw)
                err = parsed.get("error") if isinstance(parsed, dict) else None
                if isinstance(err, dict):
                    err = err.get("message")
                if err:
                    msg = str(err)
            except ValueError:
                pass
            hint = ""
            if e.code == 401:
                hint = f" (set {KEY_HINT})"
            raise ApiError(f"{msg or e.reason}{hint}", status=e.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(
                f"cannot reach the node at {self.base}: {reason}. Is it running? Start it with "
                f"`ollama-distributed start`, or point --api (or ${env.API}) at a running node.",
                exit_code=2,
            ) from None

    def get(self, path: str, timeout: float | None = None) -> Any:
        with self._request("GET", path, timeout=timeout) as resp:
            return _json(resp.read(), self.base + path)

    def post(self, path: str, body: Any, timeout: float | None = None) -> Any:
        with self._request("POST", path, body=body, timeout=timeout) as resp:
            raw = resp.read()
            return _json(raw, self.base + path) if raw.strip() else None

    def delete(self, path: str, body: Any) -> None:
        with self._request("DELETE", path, body=body):
            return None

    def delete_json(self, path: str) -> Any:
        with self._request("DELETE", path) as resp:
            return _json(resp.read(), self.base + path)

    def head(self, path: str) -> int:
        try:
            with self._request("HEAD", path):
                return 200
        except ApiError as e:
            if e.status is not None:
                return e.status
            raise

    def upload(self, path: str, file_path: str, size: int, progress: Any = None) -> None:
        def chunks() -> Iterator[bytes]:
            with open(file_path, "rb") as f:
                while chunk := f.read(1 << 20):
                    if progress is not None:
                        progress.update(len(chunk))
                    yield chunk

        req_headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        if self.token:
            req_headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + path, data=chunks(), method="POST", headers=req_headers)
        try:
            with urllib.request.urlopen(req, timeout=None):
                return None
        except urllib.error.HTTPError as e:
            raise ApiError(e.read().decode("utf-8", "replace") or str(e.reason), status=e.code) from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(f"upload to {self.base} failed: {getattr(e, 'reason', e)}", exit_code=2) from None

    def stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """POST and yield each NDJSON line as it arrives."""
        resp = self._request("POST", path, body=body, timeout=None)
        with resp:
            for line in resp:
                if not line.strip():
                    continue
                obj = _json(line, self.base + path)
                if isinstance(obj, dict) and "error" in obj:
                    raise ApiError(str(obj["error"]))
                yield obj


def _json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        snippet = raw[:80].decode("utf-8", "replace")
        raise ApiError(
            f"{where} did not answer JSON (got {snippet!r}): is --api pointing at an "
            "ollama-distributed node?", exit_code=2) from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def use_color() -> bool:
    return not env.get(env.NO_COLOR) and sys.stdout.isatty()



