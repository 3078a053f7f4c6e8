"""Model replication between nodes: every node follows the placement the
cluster's catalogue records (`cluster/placement.py`), and copies move peer to
peer over QUIC (`rust/blobs`).

- Every advert carries the node's manifests (`name -> {digest, path,
  modified, size}`, the digest being the sha256 of the manifest file), its
  tombstones (`name -> deleted_at`), labels and resources.
- The leader turns the adverts into the catalogue in the Raft state: per
  model the version kept (the newest `modified`, then the digest), its size,
  the replica count wanted (`models.replicas`, or the model's policy), the
  nodes assigned to hold it (memory fit, free disk, labels, spread by bytes,
  sticky while a node can keep it) and the nodes holding it now. A dead node
  loses its assignments after `placement.DOWN_GRACE_S`, so the count is
  restored on the others.
- Each node follows its assignments: an assigned node without the version
  (or with an older one) fetches the manifest and the blobs it lacks from
  the holders (a large blob in ranges from every holder at once; the next
  holder when one fails or sends bytes that are not their digest), then
  writes the manifest byte-identical, last, so a model is never visible half
  there. A holder that is not assigned drops its copy once the catalogue
  lists it among the holders (the placement saw it and chose others), every
  assigned node holds the version and no request runs on it here (the
  bundled default model stays on every node).
- A delete records a tombstone (persisted in `models/tombstones.json`) that
  travels in adverts and is committed in the Raft state, so every node
  removes its copy, even one that was away while every node that saw the
  delete is down, and nothing brings it back by replication; creating the
  name again later wins over the tombstone.

Clocks are assumed roughly in step (`troubleshoot` checks skew): versions and
tombstones are ordered by wall-clock time.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import ConflictError, ModelNotFoundError, OllamaDistributedError, PeerUnavailableError
from ..models import names
from ..models.fsutil import StorageError, atomic_write
from ..models.store import Store
from . import placement
from .placement import rank

logger = logging.getLogger(__name__)

# A tombstone is kept this long: far beyond any node's absence we expect to
# heal by replication (a node away longer may bring a deleted model back).
TOMBSTONE_TTL_S = 30 * 86400.0
# After a failed fetch of a version, wait this long before trying it again,
# doubling per failure up to RETRY_MAX_S: a corrupted copy somewhere must not
# be fetched again and again at full speed.
RETRY_AFTER_S = 2.0
RETRY_MAX_S = 60.0


class Replicator:
    """One node's side of replication; `tick()` is one pass, `run()` loops."""

    def __init__(self, store: Store, cluster: Any, node_id: str, replicas: int,
                 on_change: Callable[[], Awaitable[None]] | None = None, *,
                 keep: str = "", in_use: Callable[[str], bool] | None = None,
                 on_removed: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.cluster = cluster
        self.node_id = node_id
        self.replicas = max(1, replicas)
        self.on_change = on_change
        self.keep = names.parse(keep).short if keep else ""  # the bundled model: never dropped
        self.in_use = in_use or (lambda _name: False)
        self.on_removed = on_removed
        self.trimmed_total = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self.settle_s = placement.SETTLE_S
        self._first_seen: dict[tuple[str, str], float] = {}  # (name, digest) -> when the leader first saw it
        self._tomb_path = store.root / "tombstones.json"
        self.tombstones: dict[str, float] = self._load_tombstones()
        self._digests: dict[Path, tuple[tuple[int, int], str, int]] = {}
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
        try:
            atomic_write(self._tomb_path, json.dumps(self.tombstones, sort_keys=True).encode())
        except StorageError as e:
            # kept in memory, in adverts and in the Raft state; written on the next change
            logger.warning("cannot save the tombstones: %s", e.message)

    def local_manifests(self) -> dict[str, dict[str, Any]]:
        """name -> {digest (sha256 of the manifest file), path, modified, size (of its layers)}."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.store.names():
            path = self.store.manifest_path(name)
            try:
                st = path.stat()
                key = (st.st_mtime_ns, st.st_size)
                cached = self._digests.get(path)
                if cached is None or cached[0] != key:
                    raw = path.read_bytes()
                    cached = (key, hashlib.sha256(raw).hexdigest(), _layers_size(raw))
                    self._digests[path] = cached
            except OSError:
                continue
            out[name.short] = {"digest": cached[1], "path": "/".join(name.path_parts()),
                               "modified": st.st_mtime, "size": cached[2]}
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

    def node_infos(self, raw_nodes: list[dict[str, Any]], mine: dict[str, dict[str, Any]],
                   now: float) -> list[placement.NodeInfo]:
        """Placement's view of every known node; this node's manifests fresh from disk."""
        out = []
        for n in raw_nodes:
            info = placement.NodeInfo.from_node(n, now)
            if n.get("local") or n["id"] == self.node_id:
                info.alive, info.down_for, info.manifests, info.stores = True, 0.0, mine, True
            out.append(info)
        if not any(i.id == self.node_id for i in out):
            out.append(placement.NodeInfo(id=self.node_id, manifests=mine))
        return out

    def catalogue_entries_list(self) -> list[dict[str, Any]]:
        """The `model/*` entries of the catalogue in the Raft state, with their names."""
        cat = placement.loads(self.cluster.catalog())
        return [{"model": k[len(placement.MODEL):], **v} for k, v in sorted(cat.items())
                if k.startswith(placement.MODEL)]

    async def commit(self, raw: dict[str, str], changes: dict[str, dict[str, Any] | None]) -> bool:
        """Compare-and-set `changes` against `raw` (what they were computed from)."""
        if not changes:
            return True
        expect = [(k, raw.get(k)) for k in changes]
        puts = [(k, None if v is None else placement.dumps(v)) for k, v in changes.items()]
        ok: bool = await self.cluster.propose_catalog(expect, puts)
        return ok

    def _is_leader(self) -> bool:
        try:
            return str(self.cluster.status().get("role")) == "leader"
        except Exception:
            return False

    async def tick(self) -> None:
        now = time.time()
        raw_nodes = self.cluster.nodes()
        adverts = {n["id"]: (n.get("advert") or {}) for n in raw_nodes
                   if n.get("alive") and not n.get("local") and n["id"] != self.node_id}
        mine = self.local_manifests()
        self._merge_tombstones(adverts)
        infos = self.node_infos(raw_nodes, mine, now)
        raw = self.cluster.catalog()
        if self._is_leader():
            seen = {(str(name), str(m.get("digest"))) for n in infos if n.alive
                    for name, m in n.manifests.items() if isinstance(m, dict)}
            self._first_seen = {k: self._first_seen.get(k, now) for k in seen}
            young = {k for k, t in self._first_seen.items() if now - t < self.settle_s}
            changes = placement.plan(placement.loads(raw), infos, self.tombstones, self.replicas, young=young)
            if changes:
                try:
                    await self.commit(raw, changes)
                except RuntimeError as e:  # lost the lead or the quorum: the next pass retries
                    logger.debug("placement not committed: %s", e)
                raw = self.cluster.catalog()
        self.catalogue = [{"model": k[len(placement.MODEL):], **v} for k, v in sorted(placement.loads(raw).items())
                          if k.startswith(placement.MODEL)]
        changed = False
        for name, m in mine.items():
            if self.tombstones.get(name, -1.0) >= float(m["modified"]):
                changed |= await self._delete_local(name, "deleted elsewhere in the cluster")
        # who holds which manifest digest now, among the alive nodes
        holding: dict[tuple[str, str], list[str]] = {}
        for nid, a in [(self.node_id, {"manifests": mine}), *adverts.items()]:
            ms = a.get("manifests")
            if isinstance(ms, dict):
                for name, m in ms.items():
                    if isinstance(m, dict):
                        holding.setdefault((str(name), str(m.get("digest"))), []).append(nid)
        for entry in self.catalogue:
            name, digest = entry["model"], str(entry.get("digest"))
            assigned = [str(a) for a in entry.get("assigned") or []]
            local = mine.get(name)
            if local is not None and self.tombstones.get(name, -1.0) >= float(local["modified"]):
                continue
            holders = holding.get((name, digest), [])
            if local is not None and local["digest"] == digest:
                # dropped only once the placement has seen this copy and still
                # chose others, and every one of them holds the version
                if (self.node_id not in assigned and self.node_id in (entry.get("holders") or [])
                        and name != self.keep and assigned and all(a in holders for a in assigned)
                        and not self.in_use(name)):
                    changed |= await self._delete_local(
                        name, f"placed on {', '.join(assigned)} (replicas {entry.get('replicas')}, holders "
                              f"{', '.join(entry.get('holders') or [])})", trimmed=True)
                continue
            if local is not None and float(local["modified"]) >= float(entry.get("modified") or 0):
                continue  # ours is newer: the catalogue follows once the leader sees it
            if local is None and self.node_id not in assigned:
                continue
            sources = [h for h in rank(name, digest, holders) if h != self.node_id]
            failed_at, failures = self._failed.get((name, digest), (0.0, 0))
            if not sources or now - failed_at < min(RETRY_MAX_S, RETRY_AFTER_S * 2 ** max(0, failures - 1)):
                continue
            changed |= await self._replicate(name, digest, str(entry.get("path")), float(entry.get("modified") or 0),
                                             sources)
        if changed and self.on_change is not None:
            await self.on_change()

    def known(self, name: str) -> bool:
        """Whether the cluster has `name`: in the catalogue, or advertised by an alive peer."""
        if placement.MODEL + name in self.cluster.catalog():
            return True
        return any(name in ((n.get("advert") or {}).get("manifests") or {})
                   for n in self.cluster.nodes() if n.get("alive"))

    async def known_soon(self, name: str, within_s: float) -> bool:
        """known(), waiting up to `within_s` for news when there are peers: a
        model copied or pulled at another node a moment ago reaches this one
        with that node's advert (pushed at once, and again every advert
        period), so a delete or show that follows at once still finds it."""
        deadline = time.monotonic() + within_s
        while not self.known(name):
            if time.monotonic() >= deadline or not any(
                    n.get("alive") and not n.get("local") and n["id"] != self.node_id for n in self.cluster.nodes()):
                return False
            await asyncio.sleep(0.05)
        return True

    async def fetch_now(self, name: str) -> None:
        """Copy `name` here from a node that holds it (for a copy or a show at a
        node without it); ModelNotFoundError when no alive node has it."""
        adverts = [(n["id"], (n.get("advert") or {}).get("manifests") or {}) for n in self.cluster.nodes()
                   if n.get("alive") and not n.get("local") and n["id"] != self.node_id]
        best: tuple[float, str, str] | None = None
        holders: list[str] = []
        for nid, ms in adverts:
            m = ms.get(name) if isinstance(ms, dict) else None
            if not isinstance(m, dict):
                continue
            key = (float(m.get("modified") or 0), str(m.get("digest")), str(m.get("path")))
            if best is None or key[:2] > best[:2]:
                best, holders = key, [nid]
            elif key[:2] == best[:2]:
                holders.append(nid)
        if best is None or self.tombstones.get(name, -1.0) >= best[0]:
            raise ModelNotFoundError(name)
        modified, digest, path = best
        self._failed.pop((name, digest), None)
        if not await self._replicate(name, digest, path, modified, rank(name, digest, holders)):
            raise PeerUnavailableError(f"could not copy {name} from {', '.join(holders)}: {self.last_error}")
        if self.on_change is not None:
            await self.on_change()

    async def fetch_blob_for(self, manifest_hex: str, hex_digest: str) -> bool:
        """For a registry pull: fetch blob `hex_digest` from the alive peers that
        hold the manifest whose sha256 is `manifest_hex`; False when none does or
        the copy failed (the pull then downloads it from the registry)."""
        holders = []
        for n in self.cluster.nodes():
            if not n.get("alive") or n.get("local") or n["id"] == self.node_id:
                continue
            ms = (n.get("advert") or {}).get("manifests")
            if isinstance(ms, dict) and any(isinstance(m, dict) and m.get("digest") == manifest_hex
                                            for m in ms.values()):
                holders.append(n["id"])
        if not holders:
            return False
        try:
            await self.cluster.fetch_blob(rank(manifest_hex, hex_digest, holders), f"sha256:{hex_digest}")
        except OllamaDistributedError as e:
            logger.warning("blob %s from peers %s failed (%s); the registry serves it instead",
                           hex_digest[:12], ", ".join(holders), e.message)
            return False
        logger.info("blob %s came from peer(s) %s instead of the registry", hex_digest[:12], ", ".join(holders))
        return True

    # ---- explicit placement: rebalance, migrate, policy ------------------------------

    def _view(self) -> tuple[dict[str, str], list[placement.NodeInfo]]:
        now = time.time()
        return self.cluster.catalog(), self.node_infos(self.cluster.nodes(), self.local_manifests(), now)

    async def rebalance(self, model: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Place every model (or `model`) anew, spread by bytes; returns the moves."""
        for _ in range(5):
            raw, infos = self._view()
            cat = placement.loads(raw)
            if model is not None and placement.MODEL + model not in cat:
                raise ModelNotFoundError(f"model '{model}' not found in the cluster catalogue")
            changes = placement.plan(cat, infos, self.tombstones, self.replicas, fresh=True, only=model)
            moves = []
            for k, v in sorted(changes.items()):
                before = set((cat.get(k) or {}).get("assigned") or [])
                after = set((v or {}).get("assigned") or [])
                if before != after:
                    moves.append({"model": k[len(placement.MODEL):], "add": sorted(after - before),
                                  "remove": sorted(before - after), "assigned": sorted(after)})
            if dry_run or await self.commit(raw, changes):
                return {"moves": moves, "committed": not dry_run and bool(changes)}
        raise ConflictError("the catalogue kept changing during the rebalance; try again")

    async def migrate(self, model: str, source: str, target: str) -> dict[str, Any]:
        """Give `source`'s assignment of `model` to `target`; the copy moves, then
        `source` drops its own."""
        for _ in range(5):
            raw, infos = self._view()
            key = placement.MODEL + model
            cat = placement.loads(raw)
            entry = cat.get(key)
            if entry is None:
                raise ModelNotFoundError(f"model '{model}' not found in the cluster catalogue")
            try:
                new = placement.migrate(entry, infos, source, target, cat.get(placement.POLICY + model))
            except ValueError as e:
                raise ConflictError(str(e)) from None
            if await self.commit(raw, {key: new}):
                return {"model": model, "from": source, "to": target, "assigned": new["assigned"]}
        raise ConflictError("the catalogue kept changing during the migration; try again")

    async def set_policy(self, model: str, replicas: int | None, node_labels: dict[str, str]) -> dict[str, Any]:
        """Record what `model` wants (replicas, node labels); placement applies it."""
        key = placement.POLICY + model
        value = {"replicas": replicas, "node_labels": node_labels}
        for _ in range(5):
            raw = self.cluster.catalog()
            if await self.commit(raw, {key: value}):
                return {"model": model, **value}
        raise ConflictError("the catalogue kept changing; try again")

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

    async def _delete_local(self, name: str, why: str, trimmed: bool = False) -> bool:
        try:
            await asyncio.to_thread(self.store.delete, name)
        except OllamaDistributedError:
            return False
        if trimmed:
            self.trimmed_total += 1
        else:
            self.deleted_total += 1
        logger.info("removed %s: %s", name, why)
        if self.on_removed is not None:
            await self.on_removed(name)
        return True

    async def _replicate(self, name: str, digest: str, path: str, modified: float, sources: list[str]) -> bool:
        # one fetch per model at a time: a copy asked for by a user and the pass
        # that replicates the same model share the work
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if (m := self.local_manifests().get(name)) is not None and m["digest"] == digest:
                return True
            return await self._replicate_locked(name, digest, path, modified, sources)

    async def _replicate_locked(self, name: str, digest: str, path: str, modified: float,
                                sources: list[str]) -> bool:
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
        missing = [h for h in blobs if not self.store.has_blob(h)]
        sizes = {names.parse_digest(x["digest"]): int(x.get("size") or 0) for x in layers}
        need = sum(sizes.get(h, 0) for h in missing)
        free = (await asyncio.to_thread(shutil.disk_usage, self.store.root)).free
        if need > free:
            raise StorageError(f"no space left on the data dir {self.store.root} for {name}: it needs "
                               f"{need} bytes, {free} are free; free some space there or move the data "
                               "dir to a larger disk")
        for hex_digest in missing:
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
            # the catalogue in the Raft state: version kept, replicas, assigned and holding nodes
            "models": self.catalogue,
            "models_replicated_total": self.replicated_total, "models_deleted_total": self.deleted_total,
            "models_trimmed_total": self.trimmed_total,
            "copies_unplaced": sum(int(e.get("unplaced") or 0) for e in self.catalogue),
            "tombstones": dict(self.tombstones), "last_error": self.last_error,
            # committed through Raft: the record that outlives every node
            "cluster_tombstones": self.cluster.tombstones() if hasattr(self.cluster, "tombstones") else {},
        }


def _layers_size(raw: bytes) -> int:
    """The bytes a manifest's config and layers take; 0 for one that does not parse."""
    try:
        m = json.loads(raw)
        return sum(int(x.get("size") or 0) for x in [m.get("config") or {}, *(m.get("layers") or [])])
    except (ValueError, TypeError, AttributeError):
        return 0
