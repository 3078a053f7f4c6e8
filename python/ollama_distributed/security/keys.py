"""API keys: named, with a role and optional limits, stored hashed (sha256).

Where they live: in the Raft state's catalogue under `key/<name>` when the
cluster core runs, so a key works at every node and a revoke reaches every
node within a refresh (REFRESH_S); in `<data dir>/keys.json` (mode 0600) for a
node without a cluster, or while the node is down (`keys create --data-dir`).
Keys in that file move into the Raft state when the node next starts with its
cluster, and leave the file.

A key is shown once, when created: `odk_` + 32 random bytes (base64url). Only
its sha256 is kept; a lookup hashes the presented key and compares the stored
hash with `hmac.compare_digest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import BadRequestError, ConflictError, NotFoundError
from ..models.fsutil import atomic_write
from .limits import Bucket

logger = logging.getLogger(__name__)

PREFIX = "key/"  # catalogue keys in the Raft state
FILE = "keys.json"
ROLES = ("user", "admin")
KEY_PREFIX = "odk_"
PRIORITIES = ("interactive", "batch")
# A weight is a share of tokens relative to weight-1 keys: 1/100 to 100 times.
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
# How often a node re-reads the keys from the Raft state: a revoke or a new
# key takes effect within this at every node.
REFRESH_S = 0.5
# Adverts carry the keys used at a node within this long (at most this many),
# so `keys list` at any node shows a key's last use anywhere.
LAST_USED_SHARED_S = 600.0
LAST_USED_SHARED_MAX = 1000
# How long a starting node waits for a leader to take its local keys.
ATTACH_WAIT_S = 10.0
# Keys moved from the local file into the Raft state per proposal: the core
# takes at most 4096 catalogue keys and 4 MiB in one command.
MOVE_BATCH = 1000


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    name: str
    hash: str  # sha256 hex of the key
    role: str = "user"
    rpm: int = 0  # requests per minute, 0: no limit
    tpm: int = 0  # tokens (prompt + generated) per minute, 0: no limit
    created: float = 0.0
    # Fairness (rust/scheduler/fair.rs): the key's share of a busy node's
    # tokens is proportional to its weight; the class its requests get
    # without an X-Priority header.
    weight: float = 1.0
    priority: str = "interactive"

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hash")
        return d

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def loads(text: str) -> KeyRecord | None:
        try:
            d = json.loads(text)
            rec = KeyRecord(name=str(d["name"]), hash=str(d["hash"]), role=str(d.get("role", "user")),
                            rpm=int(d.get("rpm") or 0), tpm=int(d.get("tpm") or 0),
                            created=float(d.get("created") or 0.0), weight=float(d.get("weight") or 1.0),
                            priority=str(d.get("priority") or "interactive"))
        except (ValueError, KeyError, TypeError):
            return None
        if not MIN_WEIGHT <= rec.weight <= MAX_WEIGHT or rec.priority not in PRIORITIES:
            return None
        return rec if rec.role in ROLES and len(rec.hash) == 64 else None


def check_new(name: str, role: str, rpm: int, tpm: int, weight: float = 1.0,
              priority: str = "interactive") -> None:
    if not NAME_RE.match(name):
        raise BadRequestError("a key name is 1-64 letters, digits, '_', '.', '@' or '-', starting "
                              f"with a letter or digit; got {name!r}")
    if role not in ROLES:
        raise BadRequestError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    for what, n in (("rpm", rpm), ("tpm", tpm)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise BadRequestError(f"{what} must be a whole number >= 0 (0: no limit); got {n!r}")
    if (isinstance(weight, bool) or not isinstance(weight, int | float)
            or not MIN_WEIGHT <= weight <= MAX_WEIGHT):
        raise BadRequestError(f"weight must be a number from {MIN_WEIGHT} to {MAX_WEIGHT:g}; got {weight!r}")
    if priority not in PRIORITIES:
        raise BadRequestError(f"priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")


class LocalKeyFile:
    """`<data dir>/keys.json`: {"keys": {name: record}}, written atomically, mode 0600."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE

    def read(self) -> dict[str, KeyRecord]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.error("cannot read the API keys in %s (%s); no key from it is accepted", self.path, e)
            return {}
        out: dict[str, KeyRecord] = {}
        for name, value in (raw.get("keys") or {}).items():
            rec = KeyRecord.loads(json.dumps(value))
            if rec is not None and rec.name == name:
                out[name] = rec
        return out

    def write(self, keys: dict[str, KeyRecord]) -> None:
        body = {"keys": {n: asdict(r) for n, r in sorted(keys.items())}}
        atomic_write(self.path, (json.dumps(body, indent=1) + "\n").encode(), mode=0o600)

    def mtime(self) -> float:
        try:
            return self.path.stat().st_mtime_ns / 1e9
        except OSError:
            return 0.0

    def add(self, records: list[KeyRecord]) -> None:
        keys = self.read()
        for r in records:
            if r.name in keys:
                raise ConflictError(f"a key named {r.name!r} exists; revoke it first or choose another name")
            keys[r.name] = r
        self.write(keys)


def make_record(name: str, role: str = "user", rpm: int = 0, tpm: int = 0, weight: float = 1.0,
                priority: str = "interactive") -> tuple[str, KeyRecord]:
    check_new(name, role, rpm, tpm, weight, priority)
    secret = new_secret()
    return secret, KeyRecord(name=name, hash=digest(secret), role=role, rpm=rpm, tpm=tpm,
                             created=time.time(), weight=float(weight), priority=priority)


class Catalogue(Protocol):
    """The part of cluster.service.ClusterService the key ring uses."""

    def catalog(self) -> dict[str, str]: ...

    def catalog_text(self) -> str: ...

    async def propose_catalog(self, expect: list[tuple[str, str | None]],
                              puts: list[tuple[str, str | None]]) -> bool: ...


class KeyRing:
    """The keys in force at this node, with their buckets and last use."""

    def __init__(self, data_dir: Path) -> None:
        self.file = LocalKeyFile(data_dir)
        self.cluster: Catalogue | None = None
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_name: dict[str, KeyRecord] = {}
        self._raw: dict[str, str] = {}
        self._catalog_text = ""
        self._pending: dict[str, KeyRecord] = {}  # local keys still to move into the Raft state
        self._move_failed = False
        self._file_mtime = -1.0
        self.last_used: dict[str, float] = {}
        self.buckets: dict[tuple[str, str], Bucket] = {}
        # requests and tokens this node admitted per limited key (cumulative),
        # sent in adverts; and what each peer last said, to take the difference
        self.used: dict[str, list[int]] = {}
        self._peer_used: dict[str, dict[str, list[int]]] = {}
        self.entry_nodes = 1  # alive nodes that may admit a key's requests: the burst is shared
        self.refresh()

    # ---- reading -----------------------------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._by_hash)

    def lookup(self, secret: str) -> KeyRecord | None:
        h = digest(secret)
        rec = self._by_hash.get(h)
        if rec is None or not hmac.compare_digest(rec.hash, h):
            return None
        return rec

    def records(self) -> list[KeyRecord]:
        return sorted(self._by_name.values(), key=lambda r: r.name)

    def _read_cluster(self) -> dict[str, str] | None:
        """The `key/` entries, or None when the catalogue's text is as last read
        (the common case: comparing the text costs far less than decoding it)."""
        assert self.cluster is not None
        text = self.cluster.catalog_text()
        if text == self._catalog_text:
            return None
        self._catalog_text = text
        return {k: v for k, v in json.loads(text).items() if k.startswith(PREFIX)}

    def _install_raw(self, raw: dict[str, str] | None) -> None:
        if raw is None or (raw == self._raw and not self._pending):
            return
        self._raw = raw
        recs = {r.name: r for r in (KeyRecord.loads(v) for v in raw.values()) if r is not None}
        for name, r in self._pending.items():  # not in the Raft state yet: in force here meanwhile
            recs.setdefault(name, r)
        self._install(list(recs.values()))

    def refresh(self) -> None:
        if self.cluster is not None:
            self._install_raw(self._read_cluster())
            return
        mtime = self.file.mtime()
        if mtime != self._file_mtime:
            self._file_mtime = mtime
            self._install(list(self.file.read().values()))

    def _install(self, recs: list[KeyRecord]) -> None:
        self._by_name = {r.name: r for r in recs}
        self._by_hash = {r.hash: r for r in recs}
        # limits changed or key gone: start its buckets afresh
        self.buckets = {k: b for k, b in self.buckets.items()
                        if k[0] in self._by_name and b.per_minute == getattr(self._by_name[k[0]], k[1])}

    # ---- cluster -----------------------------------------------------------------

    async def attach(self, cluster: Catalogue) -> None:
        """Keep the keys in the Raft state from now on. Keys in the local file
        stay in force and move there in batches (waiting up to ATTACH_WAIT_S for
        a leader; later passes retry); the file keeps only those not moved yet,
        so a revoke in the cluster cannot be undone by it."""
        self.cluster = cluster
        self._pending = self.file.read()
        await self._move_pending(ATTACH_WAIT_S)
        self._catalog_text, self._raw = "", {"\0": ""}  # read and install afresh
        self.refresh()

    async def _move_pending(self, wait_s: float = 0.0) -> None:
        if not self._pending or self.cluster is None:
            return
        deadline = time.monotonic() + wait_s
        current = self.cluster.catalog()
        taken = sorted(n for n in self._pending if PREFIX + n in current)
        if taken:
            logger.warning("keys %s in %s not moved to the cluster: those names are taken there (the "
                           "cluster's keys of those names are in force)", ", ".join(taken), self.file.path)
            for n in taken:
                self._pending.pop(n)
        moving = sorted(self._pending.items())
        moved = 0
        for i in range(0, len(moving), MOVE_BATCH):
            batch = moving[i:i + MOVE_BATCH]
            expect: list[tuple[str, str | None]] = [(PREFIX + n, None) for n, _ in batch]
            puts: list[tuple[str, str | None]] = [(PREFIX + n, r.dumps()) for n, r in batch]
            while True:
                try:
                    ok = await self.cluster.propose_catalog(expect, puts)
                    break
                except RuntimeError as e:  # no leader yet, no quorum
                    if time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        continue
                    if not self._move_failed:
                        logger.warning("keys in %s stay local (and in force here) until the cluster "
                                       "takes them: %s", self.file.path, e)
                    self._move_failed = True
                    self.file.write(self._pending)
                    return
            if ok:
                moved += len(batch)
                for n, _ in batch:
                    self._pending.pop(n)
        if moved:
            logger.info("moved %d API key(s) from %s into the cluster state", moved, self.file.path)
        self._move_failed = False
        self.file.write(self._pending)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                if self._pending:
                    await self._move_pending()
                    self._catalog_text, self._raw = "", {"\0": ""}  # install afresh
                if self.cluster is not None:
                    # the whole catalogue crosses from Rust as JSON text (4 ms
                    # with 10,000 keys, 20 ms more to decode): read off the
                    # event loop, decoded only when it changed
                    self._install_raw(await asyncio.to_thread(self._read_cluster))
                else:
                    self.refresh()
            except Exception:
                logger.warning("reading the API keys failed; keeping the last ones", exc_info=True)

    # ---- writing -----------------------------------------------------------------

    async def create(self, name: str, role: str = "user", rpm: int = 0, tpm: int = 0, weight: float = 1.0,
                     priority: str = "interactive") -> tuple[str, KeyRecord]:
        secret, rec = make_record(name, role, rpm, tpm, weight, priority)
        if self.cluster is None:
            self.file.add([rec])
        else:
            ok = await self.cluster.propose_catalog([(PREFIX + name, None)], [(PREFIX + name, rec.dumps())])
            if not ok:
                raise ConflictError(f"a key named {name!r} exists; revoke it first or choose another name")
        self.refresh()
        return secret, rec

    async def revoke(self, name: str) -> None:
        if self.cluster is None:
            keys = self.file.read()
            if keys.pop(name, None) is None:
                raise NotFoundError(f"no key named {name!r}; see `ollama-distributed keys list`")
            self.file.write(keys)
        else:
            for _ in range(5):
                current = self.cluster.catalog().get(PREFIX + name)
                if current is None:
                    raise NotFoundError(f"no key named {name!r}; see `ollama-distributed keys list`")
                if await self.cluster.propose_catalog([(PREFIX + name, current)], [(PREFIX + name, None)]):
                    break
            else:
                raise ConflictError(f"key {name!r} kept changing; try again")
        self.refresh()

    # ---- use ---------------------------------------------------------------------

    def bucket(self, rec: KeyRecord, kind: str) -> Bucket | None:
        per_minute: int = getattr(rec, kind)
        if per_minute <= 0:
            return None
        b = self.buckets.get((rec.name, kind))
        if b is None:
            b = self.buckets[(rec.name, kind)] = Bucket(per_minute, per_minute / self.entry_nodes)
        return b

    def set_entry_nodes(self, n: int) -> None:
        """The alive nodes of the cluster: each may burst its share of a key's allowance."""
        n = max(1, n)
        if n != self.entry_nodes:
            self.entry_nodes = n
            for b in self.buckets.values():
                b.resize(b.per_minute / n)

    def admit(self, rec: KeyRecord, now: float) -> float:
        """Take one request from the key's buckets: 0.0 when admitted, else
        seconds until it could be."""
        self.last_used[rec.name] = time.time()
        tpm = self.bucket(rec, "tpm")
        if tpm is not None:
            wait = tpm.wait(now)
            if wait > 0:
                return wait
        rpm = self.bucket(rec, "rpm")
        if rpm is not None:
            wait = rpm.take(1, now)
            if wait > 0:
                return wait
        if rpm is not None or tpm is not None:
            self.used.setdefault(rec.name, [0, 0])[0] += 1
        return 0.0

    def charge(self, rec: KeyRecord, tokens: int) -> None:
        tpm = self.bucket(rec, "tpm")
        if tpm is not None:
            tpm.take(tokens, force=True)
            self.used.setdefault(rec.name, [0, 0])[1] += tokens

    def advert_fields(self) -> dict[str, Any]:
        """What peers learn from this node's advert: the cumulative use of each
        limited key, and when keys were last used here (the recent ones)."""
        out: dict[str, Any] = {"key_usage": self.used} if self.used else {}
        since = time.time() - LAST_USED_SHARED_S
        recent = sorted(((t, n) for n, t in self.last_used.items() if t >= since), reverse=True)
        if recent:
            out["key_last_used"] = {n: round(t, 3) for t, n in recent[:LAST_USED_SHARED_MAX]}
        return out

    def observe_last_used(self, seen: Any) -> None:
        """A peer's `key_last_used`: `keys list` shows the latest use at any node."""
        if not isinstance(seen, dict):
            return
        for name, t in seen.items():
            if name in self._by_name and isinstance(t, (int, float)) and not isinstance(t, bool):
                if t > self.last_used.get(name, 0.0) and t <= time.time() + 60:
                    self.last_used[name] = float(t)

    def observe_peer(self, node_id: str, usage: Any) -> None:
        """Take what a peer admitted for each limited key since its last advert
        from this node's buckets too."""
        if not isinstance(usage, dict):
            return
        known_peer = node_id in self._peer_used
        seen = self._peer_used.setdefault(node_id, {})
        for name, counts in usage.items():
            rec = self._by_name.get(name)
            if rec is None or not isinstance(counts, list) or len(counts) != 2:
                continue
            with contextlib.suppress(TypeError, ValueError):
                req, tok = int(counts[0]), int(counts[1])
                # first sight of this peer's counters: they hold its past, not news
                before = seen.get(name, [0, 0] if known_peer else [req, tok])
                d_req, d_tok = max(0, req - before[0]), max(0, tok - before[1])
                seen[name] = [req, tok]
                rpm, tpm = self.bucket(rec, "rpm"), self.bucket(rec, "tpm")
                if rpm is not None and d_req:
                    rpm.take(d_req, force=True)
                if tpm is not None and d_tok:
                    tpm.take(d_tok, force=True)

    def listing(self) -> list[dict[str, Any]]:
        return [{**r.public(), "last_used": self.last_used.get(r.name)} for r in self.records()]
