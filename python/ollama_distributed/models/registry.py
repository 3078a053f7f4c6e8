"""Pull and push models with Ollama's registry protocol (the OCI distribution API).

The model name's host part is the registry: `127.0.0.1:5000/library/smollm2:135m`
lives at `<scheme>://127.0.0.1:5000/v2/library/smollm2/manifests/135m`.

Pull: the manifest first, then each layer into `<store>/tmp/pull-<hex>.partial`
with several `Range` requests in parallel. Progress of each part is kept in
`pull-<hex>.json` beside it, so an interrupted pull (client gone, node killed,
connection cut) resumes where it stopped. Nothing is visible in the store until
its sha256 is verified; the manifest is written last. A layer whose bytes are
not its digest (a mirror or CDN in front of the registry served a bad copy) is
discarded and fetched once more, with `Cache-Control: no-cache`, before the
pull fails with a 502. The statuses streamed
are Ollama's: "pulling manifest", "pulling <12 hex>" with digest/total/completed,
"verifying sha256 digest", "writing manifest", "removing unused layers" (when
the pull replaced a model and left layers nothing uses), "success"; a layer
fetched again adds "digest mismatch for layer <12 hex>; pulling it again",
its progress from 0, and a second "verifying sha256 digest".

Push: "retrieving manifest", then for each blob "pushing <12 hex>" (HEAD to skip
blobs the registry has, POST for an upload session, one monolithic PUT for small
blobs and PATCH chunks for large ones), "pushing manifest", "success".

Talking to the registry (scheme, tokens, redirects, error messages) and the
outbound guards (SSRF: models.registries, link-local addresses) are
outbound.py's concern.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yarl

from ..errors import BadRequestError, DigestMismatchError, ModelNotFoundError
from . import names
from .fsutil import StorageError, atomic_write, storage_error
from .outbound import (
    MAX_MANIFEST,
    Policy,
    Registry,
    RegistryError,
    error_body,
    open_session,
    reason,
    snippet,
)
from .store import MANIFEST_MEDIA, Store, sha256_file

logger = logging.getLogger(__name__)

OCI_MANIFEST_MEDIA = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_ACCEPT = f"{MANIFEST_MEDIA}, {OCI_MANIFEST_MEDIA}"
# Parallel Range requests per layer. Ollama uses up to 16 parts of >= 100 MB for
# remote registries; a node pulls mostly from a registry near it, where 4 streams
# already fill the link and keep the partial file's bookkeeping small.
PARTS = 4
MIN_PART = 16 << 20
READ_CHUNK = 1 << 20
# Progress lines per digest at most this often (Ollama ticks every 60 ms).
PROGRESS_INTERVAL = 0.1
# How often the parts' progress is saved; a resumed pull re-fetches at most this much.
STATE_INTERVAL = 0.5
RETRIES = 5
MAX_LAYER = 1 << 40
# Blobs above this go up in PATCH chunks of this size, so a failed chunk costs
# little; smaller ones in a single PUT.
PUSH_CHUNK = 32 << 20
# Free space kept beyond what a pull needs, so the node can still write its state.
DISK_MARGIN = 16 << 20


def _repo(name: names.ModelName) -> str:
    return f"/v2/{name.namespace}/{name.model}"


def _remote_tag(raw_name: object, name: names.ModelName) -> str:
    """The tag as the user wrote it: the store keeps names lowercase, but an OCI
    registry's tags are case-sensitive (`q4_K_M`)."""
    raw = str(raw_name).strip()
    colon, slash = raw.rfind(":"), raw.rfind("/")
    tag = raw[colon + 1:] if colon > slash else names.DEFAULT_TAG
    return tag if tag.lower() == name.tag else name.tag


# ---- manifests ---------------------------------------------------------------------------


def _check_ref(ref: object, what: str) -> dict[str, Any]:
    if not isinstance(ref, dict):
        raise RegistryError(f"the registry's manifest has a malformed {what}")
    try:
        names.parse_digest(ref.get("digest"))
    except BadRequestError as e:
        raise RegistryError(f"the registry's manifest has a {what} with an {e.message}") from None
    size = ref.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_LAYER:
        raise RegistryError(f"the registry's manifest has a {what} with an invalid size {size!r}")
    if not isinstance(ref.get("mediaType", ""), str):
        raise RegistryError(f"the registry's manifest has a {what} with an invalid mediaType")
    return ref


def parse_manifest(raw: bytes, host: str) -> dict[str, Any]:
    """The manifest as JSON, checked enough that no field can hurt the store."""
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RegistryError(f"registry {host} answered something that is not a manifest: {snippet(raw)}") from None
    if not isinstance(manifest, dict):
        raise RegistryError(f"registry {host} answered something that is not a manifest: {snippet(raw)}")
    if "manifests" in manifest:
        raise RegistryError(f"registry {host} answered a manifest list (a multi-platform image), not a model")
    if manifest.get("schemaVersion") != 2 or not isinstance(manifest.get("layers"), list):
        raise RegistryError(f"registry {host} answered a manifest this node cannot use "
                            f"(schemaVersion {manifest.get('schemaVersion')!r}, need 2 with layers)")
    for i, layer in enumerate(manifest["layers"]):
        _check_ref(layer, f"layer {i}")
    if manifest.get("config") is not None:
        _check_ref(manifest["config"], "config")
    return manifest


async def fetch_manifest(reg: Registry, name: names.ModelName, tag: str | None = None,
                         ) -> tuple[bytes, dict[str, Any]]:
    path = f"{_repo(name)}/manifests/{tag or name.tag}"
    try:
        resp = await reg.request("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        async with resp:
            if resp.status == 404:
                raise ModelNotFoundError(f"model '{name.short}' not found in registry {name.host}")
            if resp.status in (401, 403):
                raise RegistryError(f"registry {name.host} refused access to {name.short}: "
                                    f"{await error_body(resp)}")
            if resp.status != 200:
                raise RegistryError(f"registry {name.host} answered {resp.status} for the manifest of "
                                    f"{name.short}: {await error_body(resp)}")
            raw = await resp.content.read(MAX_MANIFEST + 1)
            claimed = resp.headers.get("Docker-Content-Digest")
    except (TimeoutError, aiohttp.ClientError) as e:
        raise RegistryError(f"registry {name.host}: fetching the manifest failed: {reason(e)}") from None
    if len(raw) > MAX_MANIFEST:
        raise RegistryError(f"registry {name.host} answered more than {MAX_MANIFEST >> 20} MiB for a manifest")
    manifest = parse_manifest(raw, name.host)
    if claimed and claimed.startswith("sha256:") and claimed != "sha256:" + hashlib.sha256(raw).hexdigest():
        raise RegistryError(f"registry {name.host}: the manifest's bytes do not match its digest {claimed}")
    return raw, manifest


def _refs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Layers then config, as Ollama orders them, each digest once."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for ref in [*manifest["layers"], *([manifest["config"]] if manifest.get("config") else [])]:
        if ref["digest"] not in seen:
            seen.add(ref["digest"])
            out.append(ref)
    return out


# ---- pull ----------------------------------------------------------------------------------


@dataclass
class _Part:
    offset: int
    size: int
    done: int = 0


class _Partial:
    """A layer being downloaded: the data file and the saved progress of its parts."""

    def __init__(self, store: Store, hex_digest: str, size: int) -> None:
        self.hex = hex_digest
        self.size = size
        self.data = store.tmp / f"pull-{hex_digest}.partial"
        self.state = store.tmp / f"pull-{hex_digest}.json"
        self.parts: list[_Part] = []

    @property
    def completed(self) -> int:
        return sum(p.done for p in self.parts)

    def open(self) -> int:
        """Load saved parts (or plan new ones) and open the data file."""
        self.parts = self._load() or self._plan()
        try:
            fd = os.open(self.data, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise storage_error(e, f"partial blob sha256:{self.hex}") from e
        return fd

    def _load(self) -> list[_Part] | None:
        try:
            saved = json.loads(self.state.read_text())
            if saved["size"] != self.size or not self.data.is_file():
                return None
            parts = [_Part(int(o), int(s), int(d)) for o, s, d in saved["parts"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if sum(p.size for p in parts) != self.size or any(not 0 <= p.done <= p.size for p in parts):
            return None
        return parts

    def _plan(self) -> list[_Part]:
        with contextlib.suppress(OSError):
            self.data.unlink()
        part = max(MIN_PART, -(-self.size // PARTS))
        return [_Part(o, min(part, self.size - o)) for o in range(0, self.size, part)]

    def save(self) -> None:
        with contextlib.suppress(OSError, StorageError):
            atomic_write(self.state, json.dumps(
                {"size": self.size, "parts": [[p.offset, p.size, p.done] for p in self.parts]}).encode())

    def discard(self) -> None:
        for path in (self.data, self.state):
            with contextlib.suppress(OSError):
                path.unlink()


# One download per blob at a time on this node: two pulls sharing a layer wait
# for each other rather than writing the same partial file. Keyed by the
# partial's path, so each store (data dir) has its own.
_blob_locks: dict[Path, asyncio.Lock] = {}


def _progress(hex_digest: str, total: int, completed: int, verb: str = "pulling") -> dict[str, Any]:
    return {"status": f"{verb} {hex_digest[:12]}", "digest": f"sha256:{hex_digest}",
            "total": total, "completed": completed}


async def _download_part(reg: Registry, url: yarl.URL, fd: int, part: _Part, short: str,
                         extra: dict[str, str]) -> None:
    last: BaseException | None = None
    failures = 0  # in a row without progress: a flaky link that keeps moving never gives up
    while part.done < part.size:
        start, end = part.offset + part.done, part.offset + part.size - 1
        try:
            resp = await reg.request("GET", url, headers={"Range": f"bytes={start}-{end}", **extra})
            async with resp:
                if resp.status == 404:
                    raise RegistryError(f"registry {reg.host} does not have layer sha256:{short}… "
                                        "that its manifest lists")
                if resp.status == 206:
                    skip = 0
                elif resp.status == 200:  # Range ignored: the whole blob from byte 0
                    skip = start
                elif resp.status in (429,) or resp.status >= 500:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                      message=await error_body(resp))
                else:
                    raise RegistryError(f"registry {reg.host} answered {resp.status} for layer "
                                        f"sha256:{short}…: {await error_body(resp)}")
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    want = part.size - part.done
                    if want <= 0:
                        break
                    chunk = chunk[:want]
                    try:  # off the event loop: a write may wait on the kernel's dirty-page throttling
                        await asyncio.to_thread(os.pwrite, fd, chunk, part.offset + part.done)
                    except OSError as e:
                        raise storage_error(e, f"layer sha256:{short}") from e
                    part.done += len(chunk)
            if part.done < part.size:
                raise aiohttp.ClientPayloadError(f"connection closed after {part.done} of {part.size} bytes")
        except (TimeoutError, aiohttp.ClientError) as e:
            last = e
            failures = 1 if part.offset + part.done > start else failures + 1
            if failures > RETRIES:
                raise RegistryError(f"downloading layer sha256:{short}… from {reg.host} failed {failures} "
                                    f"times in a row: {reason(last)}") from None
            logger.info("layer sha256:%s part at %d: %s; retrying from byte %d", short, part.offset,
                        reason(e), part.offset + part.done)
            await asyncio.sleep(min(0.25 * 2 ** (failures - 1), 4.0))


async def _download(reg: Registry, name: names.ModelName, partial: _Partial,
                    again: bool = False) -> AsyncIterator[dict[str, Any]]:
    """Fill `partial` with parallel Range requests, yielding progress; kept on any
    exit but a full disk. `again`: the layer came wrong once; ask every cache on
    the way to revalidate."""
    fd = partial.open()
    try:
        url = reg.url(f"{_repo(name)}/blobs/sha256:{partial.hex}")
        short = partial.hex[:12]
        extra = {"Cache-Control": "no-cache", "Pragma": "no-cache"} if again else {}
        tasks = [asyncio.create_task(_download_part(reg, url, fd, p, short, extra))
                 for p in partial.parts if p.done < p.size]
        try:
            saved = time.monotonic()
            yield _progress(partial.hex, partial.size, partial.completed)
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=PROGRESS_INTERVAL,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                if time.monotonic() - saved > STATE_INTERVAL:
                    partial.save()
                    saved = time.monotonic()
                yield _progress(partial.hex, partial.size, partial.completed)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            partial.save()
    except StorageError:
        # A full disk: give the space back rather than keep a partial that cannot grow.
        os.close(fd)
        fd = -1
        partial.discard()
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def _fsync(path: Path) -> None:
    try:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise storage_error(e, f"layer {path.name}") from e


async def _fetch_layer(reg: Registry, name: names.ModelName, partial: _Partial,
                       again: bool = False) -> AsyncIterator[dict[str, Any]]:
    try:
        async for event in _download(reg, name, partial, again):
            yield event
    except (TimeoutError, aiohttp.ClientError) as e:
        raise RegistryError(f"registry {name.host}: {reason(e)}") from None


async def _verify_and_commit(store: Store, partial: _Partial, host: str, again: bool = False) -> None:
    """Make a downloaded layer visible once its sha256 is right; on a mismatch
    the partial is removed and DigestMismatchError (a 502) says so."""
    if not partial.data.is_file() or partial.data.stat().st_size != partial.size:
        partial.discard()
        raise RegistryError(f"layer sha256:{partial.hex[:12]}… from {host} is incomplete; pull again")
    # Hashing reads the page cache while fsync writes it out: side by side, the
    # check costs about the longer of the two instead of their sum.
    actual, _ = await asyncio.gather(asyncio.to_thread(sha256_file, partial.data),
                                     asyncio.to_thread(_fsync, partial.data))
    if actual != partial.hex:
        partial.discard()
        raise DigestMismatchError(
            f"digest mismatch for layer sha256:{partial.hex} from {host}: its bytes hash to sha256:{actual}"
            f"{', fetched a second time too' if again else ''}; nothing was kept")
    await asyncio.to_thread(store.commit_upload, partial.data, partial.hex, actual)
    with contextlib.suppress(OSError):
        partial.state.unlink()


def _check_space(store: Store, manifest: dict[str, Any]) -> None:
    """Refuse a pull that cannot fit before a byte is written (507)."""
    need = 0
    for ref in _refs(manifest):
        hex_digest = names.parse_digest(ref["digest"])
        if store.has_blob(hex_digest):
            continue
        partial = _Partial(store, hex_digest, int(ref["size"]))
        need += partial.size - sum(p.done for p in (partial._load() or []))
    free = shutil.disk_usage(store.tmp).free
    if need + DISK_MARGIN > free:
        raise StorageError(f"no space left on device for this pull: it needs {need / 1e6:.1f} MB more and "
                           f"{max(free - DISK_MARGIN, 0) / 1e6:.1f} MB are free in {store.root}; "
                           "free some disk space")


# Fetch blob `hex_digest` of the manifest whose sha256 is `manifest_hex` from
# cluster peers that hold that manifest; True once it is in the store.
FromPeers = Callable[[str, str], Awaitable[bool]]


async def pull(store: Store, raw_name: object, insecure: bool = False,
               from_peers: FromPeers | None = None,
               registries: list[str] | None = None) -> AsyncIterator[dict[str, Any]]:
    """Pull a model, yielding Ollama's progress statuses. The manifest is fetched
    before the first status, so a missing model or a bad registry fails with its
    own status code before anything is streamed. With `from_peers`, a layer a
    cluster peer already holds (it holds this very manifest) comes from it over
    QUIC instead of the registry: one download serves every box."""
    name = names.parse(raw_name)
    store.tmp.mkdir(parents=True, exist_ok=True)
    policy = Policy(registries)
    async with open_session(policy) as session:
        reg = Registry(session, name.host, insecure, policy)
        raw, manifest = await fetch_manifest(reg, name, _remote_tag(raw_name, name))
        await asyncio.to_thread(_check_space, store, manifest)
        yield {"status": "pulling manifest"}
        refs = _refs(manifest)
        manifest_hex = hashlib.sha256(raw).hexdigest()
        async with contextlib.AsyncExitStack() as held:
            # Each layer is downloaded by one pull at a time, from download to
            # commit; locks are taken in digest order, so pulls sharing layers
            # never wait on each other in a circle.
            for hex_digest in sorted(names.parse_digest(r["digest"]) for r in refs):
                lock = _blob_locks.setdefault(store.tmp / f"pull-{hex_digest}", asyncio.Lock())
                await held.enter_async_context(lock)
            fetched: list[_Partial] = []
            for ref in refs:
                hex_digest, size = names.parse_digest(ref["digest"]), int(ref["size"])
                if store.has_blob(hex_digest) or (
                        from_peers is not None and await from_peers(manifest_hex, hex_digest)):
                    yield _progress(hex_digest, size, size)
                    continue
                partial = _Partial(store, hex_digest, size)
                async for event in _fetch_layer(reg, name, partial):
                    yield event
                fetched.append(partial)
            yield {"status": "verifying sha256 digest"}
            for partial in fetched:
                try:
                    await _verify_and_commit(store, partial, name.host)
                except DigestMismatchError as e:
                    # The partial is gone. A mirror or CDN may have served a bad
                    # copy: fetch the layer once more before giving up.
                    logger.warning("%s; fetching it once more", e.message)
                    yield {"status": f"digest mismatch for layer {partial.hex[:12]}; pulling it again"}
                    async for event in _fetch_layer(reg, name, partial, again=True):
                        yield event
                    yield {"status": "verifying sha256 digest"}
                    await _verify_and_commit(store, partial, name.host, again=True)
        yield {"status": "writing manifest"}
        replaced = await asyncio.to_thread(_layers_of, store, name)
        await asyncio.to_thread(atomic_write, store.manifest_path(name), raw)
        unused = replaced - await asyncio.to_thread(store.referenced)
        if unused:
            yield {"status": "removing unused layers"}
            await asyncio.to_thread(_remove_blobs, store, unused)
        logger.info("pulled %s (%d layers, manifest sha256:%s)", name.short, len(refs),
                    hashlib.sha256(raw).hexdigest()[:12])
        yield {"status": "success"}


def _layers_of(store: Store, name: names.ModelName) -> set[str]:
    """The blobs the model's current manifest uses (none if it has none)."""
    try:
        manifest = store.get(name.short).manifest
    except ModelNotFoundError:
        return set()
    out = set()
    for ref in [manifest.get("config") or {}, *manifest["layers"]]:
        with contextlib.suppress(BadRequestError):
            out.add(names.parse_digest(ref.get("digest")))
    return out


def _remove_blobs(store: Store, hex_digests: set[str]) -> None:
    """A pull that replaced a model removes the layers nothing uses any more, as Ollama does."""
    for hex_digest in hex_digests:
        with contextlib.suppress(OSError):
            store.blob_path(hex_digest).unlink()


# ---- push ----------------------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.n = 0


def _file_body(path: Path, start: int, length: int, counter: _Counter) -> Callable[[], Any]:
    """A body factory (called again on an auth retry) streaming part of a file."""

    def make() -> Any:
        async def gen() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:  # a local open; the reads go to a thread
                f.seek(start)
                left = length
                while left > 0:
                    chunk = await asyncio.to_thread(f.read, min(READ_CHUNK, left))
                    if not chunk:
                        raise RegistryError(f"{path.name} shrank while it was being pushed")
                    left -= len(chunk)
                    counter.n += len(chunk)
                    yield chunk
        return gen()

    return make


async def _with_progress(work: Awaitable[None], hex_digest: str, total: int, base: Callable[[], int],
                         ) -> AsyncIterator[dict[str, Any]]:
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=PROGRESS_INTERVAL)
            yield _progress(hex_digest, total, min(base(), total), "pushing")
        task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _expect(resp: aiohttp.ClientResponse, ok: tuple[int, ...], what: str, host: str) -> None:
    if resp.status not in ok:
        detail = await error_body(resp)
        raise RegistryError(f"registry {host} answered {resp.status} to {what}: {detail}")


async def _upload_blob(reg: Registry, name: names.ModelName, path: Path, hex_digest: str, size: int,
                       counter: _Counter) -> None:
    digest = f"sha256:{hex_digest}"
    async with await reg.request("POST", f"{_repo(name)}/blobs/uploads/") as resp:
        await _expect(resp, (202,), "starting an upload", reg.host)
        location = resp.headers.get("Location")
    if not location:
        raise RegistryError(f"registry {reg.host} started an upload without a Location")
    url = reg.url("/").join(yarl.URL(location))
    octets = {"Content-Type": "application/octet-stream"}
    if size <= PUSH_CHUNK:
        async with await reg.request("PUT", url.extend_query(digest=digest),
                                     headers={**octets, "Content-Length": str(size)},
                                     data=_file_body(path, 0, size, counter)) as resp:
            await _expect(resp, (201,), f"the upload of {digest[:19]}", reg.host)
        return
    for start in range(0, size, PUSH_CHUNK):
        length = min(PUSH_CHUNK, size - start)
        headers = {**octets, "Content-Length": str(length), "Content-Range": f"{start}-{start + length - 1}"}
        async with await reg.request("PATCH", url, headers=headers,
                                     data=_file_body(path, start, length, counter)) as resp:
            await _expect(resp, (202,), f"a chunk of {digest[:19]}", reg.host)
            location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {reg.host} took a chunk without giving the next Location")
        url = reg.url("/").join(yarl.URL(location))
    async with await reg.request("PUT", url.extend_query(digest=digest),
                                 headers={"Content-Length": "0"}) as resp:
        await _expect(resp, (201,), f"completing the upload of {digest[:19]}", reg.host)


async def push(store: Store, raw_name: object, insecure: bool = False,
               registries: list[str] | None = None) -> AsyncIterator[dict[str, Any]]:
    """Push a local model, yielding Ollama's push statuses."""
    name = names.parse(raw_name)
    if not store.exists(name.short):
        raise ModelNotFoundError(name.short)
    raw = store.manifest_path(name).read_bytes()
    manifest = json.loads(raw)
    refs = _refs(manifest)
    blobs = []
    for ref in refs:
        hex_digest = names.parse_digest(ref["digest"])
        path = store.blob_path(hex_digest)
        if not path.is_file():
            raise BadRequestError(f"{name.short}: layer sha256:{hex_digest[:12]} is missing from the store; "
                                  "pull or create the model again")
        blobs.append((hex_digest, path, path.stat().st_size))
    policy = Policy(registries)
    async with open_session(policy) as session:
        reg = Registry(session, name.host, insecure, policy)
        try:
            # Contact first, so an unreachable registry fails before anything is streamed.
            async with await reg.request("GET", "/v2/"):
                pass
            yield {"status": "retrieving manifest"}
            for hex_digest, path, size in blobs:
                yield _progress(hex_digest, size, 0, "pushing")
                async with await reg.request("HEAD", f"{_repo(name)}/blobs/sha256:{hex_digest}") as resp:
                    exists = resp.status == 200
                if not exists:
                    counter = _Counter()
                    async for event in _with_progress(
                            _upload_blob(reg, name, path, hex_digest, size, counter), hex_digest, size,
                            lambda c=counter: c.n):  # type: ignore[misc]
                        yield event
                yield _progress(hex_digest, size, size, "pushing")
            yield {"status": "pushing manifest"}
            media = manifest.get("mediaType") or MANIFEST_MEDIA
            async with await reg.request("PUT", f"{_repo(name)}/manifests/{_remote_tag(raw_name, name)}",
                                         headers={"Content-Type": media}, data=lambda: raw) as resp:
                await _expect(resp, (201, 200), f"the manifest of {name.short}", reg.host)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise RegistryError(f"pushing to registry {name.host} failed: {reason(e)}") from None
        logger.info("pushed %s to %s", name.short, name.host)
        yield {"status": "success"}


__all__ = ["RegistryError", "fetch_manifest", "parse_manifest", "pull", "push"]
