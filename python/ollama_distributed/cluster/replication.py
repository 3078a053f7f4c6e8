"""Model replication between nodes: `models.replicas` copies of every model
across the alive nodes, moved peer to peer over QUIC (`rust/blobs`).

Each node decides for itself, from the same inputs, so no coordinator is
needed:

- Every advert carries the node's manifests (`name -> {digest, path,
  modified}`, the digest being the sha256 of the manifest file) and its
  tombstones (`name -> deleted_at`).
- For each name the newest version wins (the largest `modified`, then the
  digest). A tombstone newer than every live version deletes the model.
- While fewer than `replicas` alive nodes hold the winning version,
  rendezvous hashing of (name, manifest digest, node id) ranks the alive
  nodes without it, and the first ones make up the count (so a holder that
  dies is replaced, and `replicas: 1` moves nothing). A node holding an older
  version always updates it. A chosen node fetches the manifest and the
  blobs it lacks from a holder (a large blob in ranges from every holder at
  once; the next holder when one fails or sends bytes that are not their
  digest), then writes the manifest byte-identical, last, so a model is never
  visible half there. Extra copies (a holder that comes back) are kept.
- A delete records a tombstone (persisted in `models/tombstones.json`) that
  travels in adverts and is committed in the Raft state, so every node
  removes its copy, even one that was away while every node that saw the
  delete is down, and nothing brings it back by replication; creating the
  name again later wins over the tombstone.

Clocks are assumed roughly in step (`troubleshoot` checks skew): versions and
tombstones are ordered by wall-clock time. The fuller design of issue 6 keeps
the whole catalogue in the Raft state, decided by the leader; see
ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import OllamaDistributedError
from ..models import names
from ..models.fsutil import atomic_write
from ..models.store import Store

logger = logging.getLogger(__name__)

# A tombstone is kept this long: far beyond any node's absence we expect to
# heal by replication (a node away longer may bring a deleted model back).
TOMBSTONE_TTL_S = 30 * 86400.0
# After a failed fetch of a version, wait this long before trying it again,
# doubling per failure up to RETRY_MAX_S: a corrupted copy somewhere must not
# be fetched again and again at full speed.
RETRY_AFTER_S = 2.0
RETRY_MAX_S = 60.0


def rank(name: str, digest: str, node_ids: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of `node_ids` for one version."""
    def weight(n: str) -> bytes:
        return hashlib.sha256(f"{name}\n{digest}\n{n}".encode()).digest()
    return sorted(node_ids, key=weight, reverse=True)


class Replicator:
    """One node's side of replication; `tick()` is one pass, `run()` loops."""

    def __init__(self, store: Store, cluster: Any, node_id: str, replicas: int,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.cluster = cluster
        self.node_id = node_id
        self.replicas = max(1, replicas)
        self.on_change = on_change
        self._tomb_path = store.root / "tombstones.json"
        self.tombstones: dict[str, float] = self._load_tombstones()
        self._digests: dict[Path, tuple[tuple[int, int], str]] = {}
        self._failed: dict[tuple[str, str], tuple[float, int]] = {}
        self.catalogue: list[dict[str, Any]] = []
        self._committing: set[asyncio.Task[None]] = set()
        self.pending: dict[str, dict[str, Any]] = {}
        self.replicated_total = 0
        self.deleted_total = 0
        self.last_error: str | None = None

    # ---- local state -------------------------------------------------------------

    def _load_tombstones(self) -> dict[str, float]:
        try:
            raw = json.loads(self._tomb_path.read_text())
            return {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (OSError, ValueError, TypeError):
            return {}

    def _save_tombstones(self) -> None:
        atomic_write(self._tomb_path, json.dumps(self.tombstones, sort_keys=True).encode())

    def local_manifests(self) -> dict[str, dict[str, Any]]:
        """name -> {digest (sha256 of the manifest file), path, modified}."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.store.names():
            path = self.store.manifest_path(name)
            try:
                st = path.stat()
                key = (st.st_mtime_ns, st.st_size)
                cached = self._digests.get(path)
                if cached is None or cached[0] != key:
                    cached = (key, hashlib.sha256(path.read_bytes()).hexdigest())
                    self._digests[path] = cached
            except OSError:
                continue
            out[name.short] = {"digest": cached[1], "path": "/".join(name.path_parts()),
                               "modified": st.st_mtime}
        return out

    def advert_fields(self) -> dict[str, Any]:
        """What this node's advert carries for replication."""
        return {"manifests": self.local_manifests(), "tombstones": dict(self.tombstones)}

    def record_delete(self, raw_name: str) -> None:
        """A model deleted here by a user: remember it so it goes everywhere,
        in adverts at once and in the Raft state (which outlives every node
        that saw the delete) as soon as the leader commits it."""
        name, at = names.parse(raw_name).short, time.time()
        self.tombstones[name] = at
        self._save_tombstones()
        if hasattr(self.cluster, "put_tombstone"):
            task = asyncio.get_running_loop().create_task(self._commit_tombstone(name, at))
            self._committing.add(task)
            task.add_done_callback(self._committing.discard)

    async def _commit_tombstone(self, name: str, at: float) -> None:
        for attempt in range(30):  # a leader election takes about 3 s
            try:
                await self.cluster.put_tombstone(name, at)
                return
            except RuntimeError as e:
                if attempt == 29:
                    logger.warning("the delete of %s is not in the cluster state (%s); adverts still carry it",
                                   name, e)
                await asyncio.sleep(1.0)

    # ---- one pass ---------------------------------------------------------------

    async def tick(self) -> None:
        nodes = [n for n in self.cluster.nodes() if n.get("alive")]
        adverts = {n["id"]: (n.get("advert") or {}) for n in nodes if not n.get("local")}
        mine = self.local_manifests()
        self._merge_tombstones(adverts)
        changed = False
        alive = sorted({self.node_id, *adverts})
        # name -> digest -> (modified, path, holders)
        versions: dict[str, dict[str, tuple[float, str, list[str]]]] = {}
        for holder, manifests in [(self.node_id, mine), *((k, a.get("manifests") or {}) for k, a in adverts.items())]:
            if not isinstance(manifests, dict):
                continue
            for name, m in manifests.items():
                try:
                    digest, path, modified = str(m["digest"]), str(m["path"]), float(m["modified"])
                except (KeyError, TypeError, ValueError):
                    continue
                v = versions.setdefault(name, {})
                old = v.get(digest)
                v[digest] = (max(modified, old[0]) if old else modified, path, [*(old[2] if old else []), holder])
        catalogue = []
        for name, vs in sorted(versions.items()):
            digest, (modified, path, holders) = max(vs.items(), key=lambda kv: (kv[1][0], kv[0]))
            deleted = self.tombstones.get(name, -1.0) >= modified
            catalogue.append({"model": name, "manifest_digest": f"sha256:{digest}", "modified": modified,
                              "holders": sorted(holders), "replicas": min(self.replicas, len(alive)),
                              "deleted": deleted})
            if deleted:
                if name in mine:
                    changed |= await self._delete_local(name)
                continue
            if name in mine and mine[name]["digest"] == digest:
                continue
            if name not in mine:  # a node with an older version always updates it
                missing = self.replicas - len(holders)
                if missing <= 0:
                    continue
                if self.node_id not in [n for n in rank(name, digest, alive) if n not in holders][:missing]:
                    continue
            sources = [h for h in rank(name, digest, holders) if h != self.node_id]
            failed_at, failures = self._failed.get((name, digest), (0.0, 0))
            if not sources or time.time() - failed_at < min(RETRY_MAX_S, RETRY_AFTER_S * 2 ** max(0, failures - 1)):
                continue
            changed |= await self._replicate(name, digest, path, modified, sources)
        self.catalogue = catalogue
        if changed and self.on_change is not None:
            await self.on_change()

    def _merge_tombstones(self, adverts: dict[str, dict[str, Any]]) -> None:
        now = time.time()
        merged = dict(self.tombstones)
        if hasattr(self.cluster, "tombstones"):
            for name, at in self.cluster.tombstones().items():
                if at > merged.get(name, -1.0):
                    merged[name] = at
        for a in adverts.values():
            t = a.get("tombstones")
            if not isinstance(t, dict):
                continue
            for name, at in t.items():
                with contextlib.suppress(TypeError, ValueError):
                    if float(at) > merged.get(str(name), -1.0):
                        merged[str(name)] = float(at)
        merged = {k: v for k, v in merged.items() if now - v < TOMBSTONE_TTL_S}
        if merged != self.tombstones:
            self.tombstones = merged
            self._save_tombstones()

    async def _delete_local(self, name: str) -> bool:
        try:
            await asyncio.to_thread(self.store.delete, name)
        except OllamaDistributedError:
            return False
        self.deleted_total += 1
        logger.info("removed %s: deleted elsewhere in the cluster", name)
        return True

    async def _replicate(self, name: str, digest: str, path: str, modified: float, sources: list[str]) -> bool:
        self.pending[name] = {"model": name, "digest": f"sha256:{digest}", "sources": sources,
                              "started": time.time()}
        try:
            for source in sources:
                try:
                    await self._fetch_model(name, digest, path, modified, source,
                                            [s for s in sources if s != source])
                except OllamaDistributedError as e:
                    self.last_error = f"{name} from {source}: {e.message}"
                    logger.warning("replicating %s from %s failed: %s", name, source, e.message)
                    continue
                self.replicated_total += 1
                self._failed.pop((name, digest), None)
                logger.info("replicated %s (manifest sha256:%s) from %s", name, digest[:12], source)
                return True
            self._failed[(name, digest)] = (time.time(), self._failed.get((name, digest), (0.0, 0))[1] + 1)
            return False
        finally:
            self.pending.pop(name, None)

    async def _fetch_model(self, name: str, digest: str, path: str, modified: float, source: str,
                           others: list[str]) -> None:
        raw = await self.cluster.fetch_manifest(source, path, digest)
        try:
            manifest = json.loads(raw)
            layers = [manifest["config"], *manifest["layers"]]
            blobs = [names.parse_digest(layer["digest"]) for layer in layers]
        except (ValueError, KeyError, TypeError) as e:
            raise OllamaDistributedError(f"malformed manifest for {name}: {e}") from None
        target = self.store.manifest_path(names.parse(name))
        if "/".join(names.parse(name).path_parts()) != path:
            raise OllamaDistributedError(f"manifest path {path!r} does not name {name}")
        for hex_digest in blobs:
            if not self.store.has_blob(hex_digest):
                await self.cluster.fetch_blob([source, *others], f"sha256:{hex_digest}")
        await asyncio.to_thread(atomic_write, target, raw)
        # The copy carries the version's time, so every holder advertises the same.
        os.utime(target, (modified, modified))

    async def run(self, interval: float = 1.0) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad pass must not end replication
                logger.exception("replication pass failed")
            await asyncio.sleep(interval)

    # ---- status -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        core = self.cluster.transfers()
        return {
            "node_id": self.node_id, "replicas": self.replicas,
            "transfers": core["transfers"], "totals": core["totals"],
            "bandwidth_limit_bytes_per_sec": core["bandwidth_limit_bytes_per_sec"],
            "models_in_progress": list(self.pending.values()),
            # every version the alive nodes advertise: the newest per name, who holds it
            "models": self.catalogue,
            "models_replicated_total": self.replicated_total, "models_deleted_total": self.deleted_total,
            "tombstones": dict(self.tombstones), "last_error": self.last_error,
            # committed through Raft: the record that outlives every node
            "cluster_tombstones": self.cluster.tombstones() if hasattr(self.cluster, "tombstones") else {},
        }
