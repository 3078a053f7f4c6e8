"""Placement: which nodes hold which model, decided from the cluster's view.

The catalogue lives in the Raft state (`Command::Catalog`, a compare-and-set
on key -> JSON text) so every node reads the same one:

- `model/<name>`: the version the cluster keeps (manifest digest, its path in
  the store, the version's time, size), the desired replica count, the nodes
  assigned to hold it and the nodes that hold it now (from their adverts).
  Only placement writes it: the leader on every pass, or any node for an
  explicit rebalance or migrate, always by compare-and-set against what it
  read, so no update is lost.
- `policy/<name>`: what a user asked for one model (replicas, node labels),
  written by `POST /api/distributed/placement`.

`plan()` is pure: from the catalogue and the nodes' adverts it computes the
entries that should change. Nodes then follow their assignment (see
replication.py): an assigned node fetches the model, a holder that is no
longer assigned drops its copy once every assigned node holds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

MODEL = "model/"
POLICY = "policy/"
# Room left on a node's disk after a copy lands there.
DISK_HEADROOM = 256 * 1024 * 1024
# A node silent for less than this keeps its assignments: a restart or a
# lost advert must not move models around.
DOWN_GRACE_S = 5.0
# A version first seen this recently is not copied yet (see plan()).
SETTLE_S = 1.5


def rank(name: str, digest: str, node_ids: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of `node_ids` for one version:
    a tie-breaker that spreads models and moves few when nodes come and go."""
    def weight(n: str) -> bytes:
        return hashlib.sha256(f"{name}\n{digest}\n{n}".encode()).digest()
    return sorted(node_ids, key=weight, reverse=True)


@dataclass
class NodeInfo:
    """One node as placement sees it, from its advert and liveness."""

    id: str
    alive: bool = True
    down_for: float = 0.0  # seconds since last heard, when not alive
    stores: bool = True  # its engine keeps a model store (llamacpp)
    memory_bytes: int = 0  # RAM (or VRAM, the larger) a model must fit in; 0: unknown
    disk_free_bytes: int = -1  # on its data dir; -1: unknown
    labels: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {digest, path, modified, size}

    @classmethod
    def from_node(cls, n: dict[str, Any], now: float) -> NodeInfo:
        """From an entry of `ClusterService.nodes()` (or the local advert)."""
        adv = n.get("advert") or {}
        res = adv.get("resources") or {}
        manifests = adv.get("manifests")
        labels = adv.get("labels") or {}
        last_seen = n.get("last_seen") or 0.0
        return cls(
            id=str(n["id"]), alive=bool(n.get("alive")),
            down_for=0.0 if n.get("alive") else max(0.0, now - float(last_seen)) if last_seen else 1e9,
            stores=isinstance(manifests, dict),
            memory_bytes=max(int(res.get("memory_total_bytes") or 0), int(res.get("vram_total_bytes") or 0)),
            disk_free_bytes=(max(0, int(res["disk_total_bytes"]) - int(res.get("disk_used_bytes") or 0))
                             if res.get("disk_total_bytes") else -1),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
            manifests=manifests if isinstance(manifests, dict) else {},
        )


def why_not(n: NodeInfo, size: int, labels: dict[str, str], holds: bool) -> str | None:
    """Why `n` cannot hold a model of `size` bytes wanting `labels`; None when
    it can. The reasons are stable words (they go into the Raft state, which
    must not change with every advert)."""
    if not n.alive:
        return "node down"
    if not n.stores:
        return "its engine keeps no model store"
    for k, v in labels.items():
        if n.labels.get(k) != v:
            return f"label {k}={v} missing"
    if n.memory_bytes and size > n.memory_bytes:
        return "the model is larger than its memory"
    if not holds and n.disk_free_bytes >= 0 and size + DISK_HEADROOM > n.disk_free_bytes:
        return "not enough free disk (the model plus 256 MiB headroom)"
    return None


def _able(n: NodeInfo | None, size: int, labels: dict[str, str], holders: list[str],
          grace: bool = False) -> bool:
    """Whether `n` can hold the model; with `grace`, a node down only briefly can."""
    if n is None:
        return False
    if grace and not n.alive and n.down_for < DOWN_GRACE_S:
        return True
    return why_not(n, size, labels, n.id in holders) is None


def _versions(nodes: list[NodeInfo]) -> dict[str, dict[str, dict[str, Any]]]:
    """name -> digest -> {path, modified, size, holders} over the alive nodes."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for n in nodes:
        if not n.alive:
            continue
        for name, m in n.manifests.items():
            try:
                digest, path, modified = str(m["digest"]), str(m["path"]), float(m["modified"])
                size = int(m.get("size") or 0)
            except (KeyError, TypeError, ValueError):
                continue
            v = out.setdefault(str(name), {}).setdefault(digest, {"path": path, "modified": modified,
                                                                  "size": size, "holders": []})
            v["modified"] = max(v["modified"], modified)
            v["size"] = max(v["size"], size)
            v["holders"].append(n.id)
    return out


def loads(catalog: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The catalogue's model and policy entries, parsed; an unreadable one is
    skipped, and other entries (API keys, `key/`) are not parsed at all."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in catalog.items():
        if not k.startswith((MODEL, POLICY)):
            continue
        try:
            d = json.loads(v)
        except ValueError:
            continue
        if isinstance(d, dict):
            out[k] = d
    return out


def dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def plan(catalog: dict[str, dict[str, Any]], nodes: list[NodeInfo], tombstones: dict[str, float],
         default_replicas: int, *, fresh: bool = False, only: str | None = None,
         young: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset(),
         ) -> dict[str, dict[str, Any] | None]:
    """The `model/*` entries that should change: key -> new value (None: remove).

    Sticky by default, and as few transfers as possible. The count is filled
    in this order: nodes pinned by a migration or a rebalance until they hold
    the model; assigned holders; other holders (a copy that is already there
    beats one still on its way); assigned nodes still fetching (down less
    than DOWN_GRACE_S counts as able); then the nodes with the fewest bytes
    assigned. A version in `young` (first seen moments ago) is not copied
    anywhere yet, so copies made on several nodes at about the same time are
    not shuffled around. `fresh` (a rebalance) forgets the assignments and
    spreads every model anew by bytes assigned, preferring holders on a tie,
    and pins the nodes it chose that must fetch.
    """
    by_id = {n.id: n for n in nodes}
    versions = _versions(nodes)
    names = sorted({*versions, *(k[len(MODEL):] for k in catalog if k.startswith(MODEL))})
    # Bytes assigned per node so far, for spreading; the largest models first.
    assigned_bytes: dict[str, int] = {n.id: 0 for n in nodes}
    entries: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []
    for name in names:
        old = catalog.get(MODEL + name)
        vs = versions.get(name, {})
        cands = [(v["modified"], d, v) for d, v in vs.items()]
        if old is not None and old.get("digest") not in vs:
            cands.append((float(old.get("modified") or 0), str(old.get("digest")),
                          {"path": old.get("path"), "modified": float(old.get("modified") or 0),
                           "size": int(old.get("size") or 0), "holders": []}))
        if not cands:
            entries.append((name, old, {}))
            continue
        modified, digest, v = max(cands, key=lambda c: (c[0], c[1]))
        if tombstones.get(name, -1.0) >= modified:
            entries.append((name, old, {}))
            continue
        entries.append((name, old, {"digest": digest, "path": v["path"], "modified": modified,
                                    "size": v["size"], "holders": sorted(v["holders"])}))
    entries.sort(key=lambda e: (-int(e[2].get("size") or 0), e[0]))
    changes: dict[str, dict[str, Any] | None] = {}
    for name, old, version in entries:
        key = MODEL + name
        if not version:
            if old is not None:
                changes[key] = None
            continue
        policy = catalog.get(POLICY + name) or {}
        want = int(policy.get("replicas") or default_replicas)
        labels: dict[str, str] = policy["node_labels"] if isinstance(policy.get("node_labels"), dict) else {}
        size, holders = int(version["size"]), list(version["holders"])
        if only is not None and name != only:
            for a in (old or {}).get("assigned") or []:
                if a in assigned_bytes:
                    assigned_bytes[a] += size
            continue
        keep = old is not None and old.get("digest") == version["digest"] and not fresh
        prev = [str(a) for a in (old or {}).get("assigned") or []] if keep else []
        pins = [str(p) for p in (old or {}).get("pinned") or [] if p not in holders] if keep else []
        order = rank(name, version["digest"], [n.id for n in nodes])
        pos = {nid: i for i, nid in enumerate(order)}

        def ok(nid: str, grace: bool = False, size: int = size, labels: dict[str, str] = labels,
               holders: list[str] = holders) -> bool:
            return _able(by_id.get(nid), size, labels, holders, grace)

        assigned: list[str] = []

        def take(cands: list[str], assigned: list[str] = assigned, want: int = want) -> None:
            for nid in cands:
                if len(assigned) < want and nid not in assigned:
                    assigned.append(nid)

        if fresh:
            take(sorted((nid for nid in order if ok(nid)),
                        key=lambda nid: (assigned_bytes.get(nid, 0), nid not in holders, pos[nid])))
        else:
            take([p for p in pins if ok(p, grace=True)])
            take([a for a in prev if a in holders and ok(a)])
            take(sorted((h for h in holders if ok(h)), key=lambda h: (assigned_bytes.get(h, 0), pos[h])))
            take([a for a in prev if ok(a, grace=True)])
            if (name, version["digest"]) not in young:
                take(sorted((nid for nid in order if ok(nid)), key=lambda nid: (assigned_bytes.get(nid, 0), pos[nid])))
        for a in assigned:
            assigned_bytes[a] = assigned_bytes.get(a, 0) + size
        pinned = sorted(a for a in assigned if a not in holders and (fresh or a in pins))
        unable = {n.id: r for n in nodes if n.id not in assigned
                  and (r := why_not(n, size, labels, n.id in holders)) is not None}
        # copies wanted that a known node could take but none can; a cluster
        # smaller than the count is not short of anything it could fix
        unplaced = max(0, min(want, len(nodes)) - len(assigned))
        new = {**version, "replicas": want, "node_labels": labels, "assigned": sorted(assigned),
               "pinned": pinned, "unplaced": unplaced, "why_not": unable if unplaced else {}}
        if new != old:
            changes[key] = new
    return changes


def migrate(entry: dict[str, Any], nodes: list[NodeInfo], source: str, target: str,
            policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """`entry` with `source`'s assignment given to `target` (checked against the
    model's current `policy` when given); ValueError naming why not."""
    by_id = {n.id: n for n in nodes}
    assigned = list(entry.get("assigned") or [])
    holders = list(entry.get("holders") or [])
    if source not in assigned:
        raise ValueError(f"node '{source}' is not assigned this model "
                         f"(assigned: {', '.join(assigned) or 'none'})")
    if target == source:
        raise ValueError("from and to name the same node")
    if target in assigned:
        raise ValueError(f"node '{target}' is already assigned this model")
    n = by_id.get(target)
    if n is None:
        raise ValueError(f"unknown node '{target}'; see GET /api/distributed/nodes")
    src = policy if policy is not None else entry
    labels: dict[str, str] = src["node_labels"] if isinstance(src.get("node_labels"), dict) else {}
    reason = why_not(n, int(entry.get("size") or 0), labels, target in holders)
    if reason is not None:
        raise ValueError(f"node '{target}' cannot hold it: {reason}")
    new_assigned = sorted({*(a for a in assigned if a != source), target})
    pinned = sorted({*(p for p in entry.get("pinned") or [] if p != source), target} - set(holders))
    return {**entry, "assigned": new_assigned, "pinned": pinned,
            "unplaced": max(0, min(int(entry.get("replicas") or 0), len(nodes)) - len(new_assigned)),
            "why_not": {}}
