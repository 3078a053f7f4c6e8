"""The model store, in Ollama's layout under the data dir.

    models/blobs/sha256-<hex>
    models/manifests/<host>/<namespace>/<model>/<tag>

Every write is atomic (fsutil). Blobs are content-addressed and verified by
sha256 before they become visible; manifests reference them by digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRequestError, ModelNotFoundError
from . import names
from .fsutil import StorageError, atomic_write, fsync_dir, storage_error
from .names import ModelName

logger = logging.getLogger(__name__)

MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA = "application/vnd.ollama.image.model"
TEMPLATE_MEDIA = "application/vnd.ollama.image.template"
SYSTEM_MEDIA = "application/vnd.ollama.image.system"
PARAMS_MEDIA = "application/vnd.ollama.image.params"
LICENSE_MEDIA = "application/vnd.ollama.image.license"
CHUNK = 1 << 20
PULL_PARTIAL_MAX_AGE = 7 * 86400.0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelRecord:
    """One model as the engines and the API see it."""

    name: names.ModelName
    digest: str  # sha256 of the manifest bytes
    size: int  # all layers
    modified_at: float
    manifest: dict[str, Any]
    config: dict[str, Any]
    model_path: Path | None
    model_digest: str | None
    template: str | None = None
    system: str | None = None
    license: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def details(self) -> dict[str, Any]:
        c = self.config
        return {
            "parent_model": c.get("parent_model", ""),
            "format": c.get("model_format", "gguf"),
            "family": c.get("model_family", ""),
            "families": c.get("model_families") or None,
            "parameter_size": c.get("model_type", ""),
            "quantization_level": c.get("file_type", ""),
        }


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.tmp = root / "tmp"
        # Parsed records by name, valid while their manifest file is unchanged:
        # one stat per request instead of re-reading manifest, config and layers.
        self._records: dict[ModelName, tuple[tuple[int, int, int], ModelRecord]] = {}

    def ensure(self) -> None:
        for d in (self.blobs, self.manifests, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes cut short (crash, full disk) are never visible; drop them.
        for leftover in self.tmp.glob("upload-*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        # An interrupted registry pull (models/registry.py) keeps its parts to
        # resume; one nobody came back for in a week only holds disk.
        now = time.time()
        # Peer transfers (rust/blobs) resume from tmp/p2p-*.partial the same way.
        for partial in (*self.tmp.glob("pull-*"), *self.tmp.glob("p2p-*")):
            with contextlib.suppress(OSError):
                if now - partial.stat().st_mtime > PULL_PARTIAL_MAX_AGE:
                    partial.unlink()

    # ---- blobs -----------------------------------------------------------------

    def blob_path(self, hex_digest: str) -> Path:
        if len(hex_digest) != 64 or any(c not in "0123456789abcdef" for c in hex_digest):
            raise BadRequestError(f"invalid digest sha256:{hex_digest}")
        return self.blobs / f"sha256-{hex_digest}"

    def has_blob(self, hex_digest: str) -> bool:
        return self.blob_path(hex_digest).is_file()

    def new_upload(self) -> tuple[int, Path]:
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="upload-", dir=self.tmp)
        return fd, Path(path)

    def commit_upload(self, tmp: Path, expected: str, actual: str) -> Path:
        """Make a verified upload visible; a mismatch deletes it."""
        if expected != actual:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise BadRequestError(
                f"digest mismatch: expected sha256:{expected}, got sha256:{actual}"
            )
        dest = self.blob_path(expected)
        try:
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
            fsync_dir(self.blobs)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(e, f"blob sha256:{expected}") from e
        return dest

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            atomic_write(path, data)
        return digest, len(data)

    def import_file(self, src: Path, digest: str | None = None) -> tuple[str, int]:
        """Bring a local file into the store: hard link when possible, else copy.

        The content is hashed, so a wrong `digest` is caught before it is visible.
        """
        actual = sha256_file(src)
        if digest is not None and digest != actual:
            raise BadRequestError(f"{src.name}: sha256 is {actual}, expected {digest}")
        dest = self.blob_path(actual)
        size = src.stat().st_size
        if dest.exists() and dest.stat().st_size == size:
            return actual, size
        self.blobs.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs / f".tmp-link-{actual}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dest)
            fsync_dir(self.blobs)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise storage_error(e, f"blob sha256:{actual}") from e
        return actual, size

    # ---- manifests ---------------------------------------------------------------

    def manifest_path(self, name: names.ModelName) -> Path:
        return self.manifests.joinpath(*name.path_parts())

    def write_manifest(self, name: names.ModelName, layers: list[dict[str, Any]],
                       config: dict[str, Any]) -> str:
        for layer in layers:
            if not self.has_blob(names.parse_digest(layer["digest"])):
                raise BadRequestError(f"layer {layer['digest']} is not in the store")
        config_digest, config_size = self.put_bytes(json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA,
            "config": {"mediaType": CONFIG_MEDIA, "digest": f"sha256:{config_digest}",
                       "size": config_size},
            "layers": layers,
        }
        data = json.dumps(manifest, indent=2).encode()
        atomic_write(self.manifest_path(name), data)
        return hashlib.sha256(data).hexdigest()

    def _read_manifest(self, name: names.ModelName) -> tuple[dict[str, Any], bytes, float] | None:
        path = self.manifest_path(name)
        try:
            data = path.read_bytes()
            mtime = path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            manifest = json.loads(data)
        except ValueError:
            logger.warning("ignoring unreadable manifest %s", path)
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
            logger.warning("ignoring malformed manifest %s", path)
            return None
        return manifest, data, mtime

    def names(self) -> list[names.ModelName]:
        out: list[names.ModelName] = []
        if not self.manifests.is_dir():
            return out
        for path in self.manifests.glob("*/*/*/*"):
            if not path.is_file() or path.name.startswith(".tmp-"):
                continue
            host, ns, model, tag = path.relative_to(self.manifests).parts
            try:
                out.append(names.parse(f"{host}/{ns}/{model}:{tag}"))
            except BadRequestError:
                logger.warning("ignoring manifest with an invalid name: %s", path)
        return sorted(out)

    def get(self, raw_name: object) -> ModelRecord:
        """The model's record; cheap (one stat) while its manifest is unchanged."""
        name = names.parse(raw_name)
        try:
            st = self.manifest_path(name).stat()
        except (FileNotFoundError, NotADirectoryError):
            self._records.pop(name, None)
            raise ModelNotFoundError(str(raw_name)) from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._records.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        rec = self._load(name, raw_name)
        self._records[name] = (key, rec)
        return rec

    def _load(self, name: ModelName, raw_name: object) -> ModelRecord:
        found = self._read_manifest(name)
        if found is None:
            raise ModelNotFoundError(str(raw_name))
        manifest, data, mtime = found
        config: dict[str, Any] = {}
        cfg_ref = manifest.get("config") or {}
        with contextlib.suppress(Exception):
            cfg_hex = names.parse_digest(cfg_ref.get("digest"))
            config = json.loads(self.blob_path(cfg_hex).read_bytes())
        rec = ModelRecord(
            name=name,
            digest=hashlib.sha256(data).hexdigest(),
            size=sum(int(layer.get("size", 0)) for layer in manifest["layers"]),
            modified_at=mtime,
            manifest=manifest,
            config=config,
            model_path=None,
            model_digest=None,
        )
        for layer in manifest["layers"]:
            media = layer.get("mediaType")
            try:
                hex_digest = names.parse_digest(layer.get("digest"))
            except BadRequestError:
                continue
            path = self.blob_path(hex_digest)
            if media == MODEL_MEDIA:
                rec.model_path, rec.model_digest = path, hex_digest
            elif media in (TEMPLATE_MEDIA, SYSTEM_MEDIA, LICENSE_MEDIA, PARAMS_MEDIA):
                try:
                    text = path.read_text(encoding="utf-8")
                except OSError:
                    continue
                if media == TEMPLATE_MEDIA:
                    rec.template = text
                elif media == SYSTEM_MEDIA:
                    rec.system = text
                elif media == LICENSE_MEDIA:
                    rec.license = text
                else:
                    with contextlib.suppress(ValueError):
                        params = json.loads(text)
                        if isinstance(params, dict):
                            rec.parameters = params
        return rec

    def records(self) -> list[ModelRecord]:
        out = []
        for name in self.names():
            with contextlib.suppress(ModelNotFoundError):
                out.append(self.get(name.short))
        return out

    def exists(self, raw_name: object) -> bool:
        return self._read_manifest(names.parse(raw_name)) is not None

    def copy(self, source: object, destination: object) -> None:
        src = names.parse(source)
        dst = names.parse(destination)
        found = self._read_manifest(src)
        if found is None:
            raise ModelNotFoundError(str(source))
        atomic_write(self.manifest_path(dst), found[1])

    def delete(self, raw_name: object) -> None:
        name = names.parse(raw_name)
        path = self.manifest_path(name)
        if self._read_manifest(name) is None:
            raise ModelNotFoundError(str(raw_name))
        path.unlink()
        # Prune empty folders up to manifests/.
        parent = path.parent
        while parent != self.manifests:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        self.gc()

    def referenced(self) -> set[str]:
        refs: set[str] = set()
        for name in self.names():
            found = self._read_manifest(name)
            if found is None:
                continue
            manifest = found[0]
            for layer in [manifest.get("config") or {}, *manifest["layers"]]:
                with contextlib.suppress(BadRequestError):
                    refs.add(names.parse_digest(layer.get("digest")))
        return refs

    def gc(self, grace_seconds: float = 600.0) -> int:
        """Remove blobs no manifest references. A blob younger than the grace
        period is kept: it may be an upload waiting for its /api/create."""
        refs = self.referenced()
        removed = 0
        now = time.time()
        for blob in self.blobs.glob("sha256-*"):
            hex_digest = blob.name[len("sha256-") :]
            if hex_digest in refs:
                continue
            with contextlib.suppress(OSError):
                if now - blob.stat().st_mtime < grace_seconds:
                    continue
                blob.unlink()
                removed += 1
        return removed

    def verify(self) -> list[tuple[str, str]]:
        """Every referenced blob's sha256: (digest, problem) for each bad one."""
        problems = []
        for hex_digest in sorted(self.referenced()):
            path = self.blob_path(hex_digest)
            if not path.is_file():
                problems.append((hex_digest, "missing"))
            elif sha256_file(path) != hex_digest:
                problems.append((hex_digest, "sha256 mismatch"))
        return problems


def layer(media_type: str, hex_digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": f"sha256:{hex_digest}", "size": size}


__all__ = ["ModelRecord", "StorageError", "Store", "layer", "sha256_file"]
