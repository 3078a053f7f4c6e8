"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import OllamaDistributedError


class StorageError(OllamaDistributedError):
    """The store could not write (disk full, read-only, permissions)."""

    status = 507


def storage_error(e: OSError, what: str) -> StorageError:
    if e.errno == errno.ENOSPC:
        return StorageError(f"no space left on device while writing {what}; free some disk space")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {what}: {e.strerror}; check the data dir's permissions")
    return StorageError(f"cannot write {what}: {e.strerror or e}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a temp file; on success it replaces `path` whole, else it vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise storage_error(e, path.name) from e
        raise


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_open(path, mode) as f:
        f.write(data)
