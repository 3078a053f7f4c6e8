"""A peer's advert, checked field by field before anything uses it.

Adverts come from other nodes: a buggy or hostile peer may send nulls,
negative or huge numbers, wrong types or names no model can have. `check()`
returns the advert with every field the scheduler and the API read in its
expected type and range, or raises `BadAdvert` naming the field; the node then
keeps the peer's previous state and counts the rejection, nothing else.
"""

from __future__ import annotations

from typing import Any

from ..models import names

# Bounds far above any real node, low enough that nothing downstream overflows
# or allocates without limit.
MAX_COUNT = 1_000_000
MAX_MODELS = 10_000
MAX_TEXT = 1024
MAX_MIB = 2**40  # a memory size in MiB: an exbibyte, far above any machine
# Prompt-prefix block hashes (rust/scheduler/prefix.rs) a node may advertise:
# 16,384 × 64-byte blocks is 1 MiB of warm prompt text, far above what a node
# keeps warm, and about 340 KB of JSON at worst.
MAX_PREFIX_HASHES = 16_384


class BadAdvert(ValueError):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


def _count(adv: dict[str, Any], key: str) -> int:
    v = adv.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadAdvert(key, f"expected an integer, got {type(v).__name__}")
    if not 0 <= v <= MAX_COUNT:
        raise BadAdvert(key, f"out of range: {v}")
    return v


def _models(adv: dict[str, Any], key: str) -> list[str]:
    v = adv.get(key, [])
    if not isinstance(v, list):
        raise BadAdvert(key, f"expected a list, got {type(v).__name__}")
    if len(v) > MAX_MODELS:
        raise BadAdvert(key, f"too many entries: {len(v)}")
    out = []
    for m in v:
        if not isinstance(m, str) or len(m) > MAX_TEXT:
            raise BadAdvert(key, "expected model names")
        try:
            names.parse(m)
        except Exception:
            raise BadAdvert(key, f"not a model name: {m[:64]!r}") from None
        out.append(m)
    return out


def _text(adv: dict[str, Any], key: str) -> str | None:
    v = adv.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise BadAdvert(key, "expected a short string")
    return v


def _hashes(adv: dict[str, Any], key: str) -> list[int] | None:
    v = adv.get(key)
    if v is None:
        return None  # a node from before prefix routing: the router keeps its guess
    if not isinstance(v, list):
        raise BadAdvert(key, f"expected a list, got {type(v).__name__}")
    if len(v) > MAX_PREFIX_HASHES:
        raise BadAdvert(key, f"too many entries: {len(v)}")
    if not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 2**64 for h in v):
        raise BadAdvert(key, "expected unsigned 64-bit integers")
    return v


def check(adv: Any) -> dict[str, Any]:
    """The advert with its fields checked; BadAdvert when one is wrong."""
    if adv is None:
        return {}
    if not isinstance(adv, dict):
        raise BadAdvert("advert", f"expected an object, got {type(adv).__name__}")
    out = dict(adv)
    for key in ("in_flight", "queue_depth", "max_queue", "max_loaded_models"):
        out[key] = _count(adv, key)
    for key in ("models", "loaded", "busy"):
        out[key] = _models(adv, key)
    hashes = _hashes(adv, "prefix_hashes")
    if hashes is None:
        out.pop("prefix_hashes", None)
    else:
        out["prefix_hashes"] = hashes
    for key in ("name", "version", "api_address", "engine"):
        text = _text(adv, key)
        if text is None:
            out.pop(key, None)
        else:
            out[key] = text
    res = adv.get("resources", {})
    if not isinstance(res, dict):
        raise BadAdvert("resources", f"expected an object, got {type(res).__name__}")
    clean: dict[str, float] = {}
    for k, v in res.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 2**63):
            raise BadAdvert(f"resources.{k}", "expected a non-negative number")
        clean[str(k)] = v
    out["resources"] = clean
    if not isinstance(adv.get("draining", False), bool):
        raise BadAdvert("draining", "expected true or false")
    if not isinstance(adv.get("rpc_ready", False), bool):
        raise BadAdvert("rpc_ready", "expected true or false")
    mib = adv.get("rpc_memory_mib", 0)
    if isinstance(mib, bool) or not isinstance(mib, int) or not 0 <= mib <= MAX_MIB:
        raise BadAdvert("rpc_memory_mib", "expected an integer of MiB >= 0")
    if "rpc_memory_mib" in adv and not adv.get("rpc_ready", False):
        out["rpc_memory_mib"] = 0  # memory behind a server that is not serving is no memory
    labels = adv.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in labels.items()):
        raise BadAdvert("labels", "expected an object of strings")
    return out
