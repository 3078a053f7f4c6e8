"""The registry client's pure parts: manifest checks and the resumable partial file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed.models import registry
from ollama_distributed.models.registry import RegistryError, _Partial, _refs, parse_manifest
from ollama_distributed.models.store import Store

HEX = "ab" * 32


def ref(digest: str = f"sha256:{HEX}", size: Any = 10, media: Any = "m") -> dict[str, Any]:
    return {"mediaType": media, "digest": digest, "size": size}


def manifest(**over: Any) -> bytes:
    m: dict[str, Any] = {"schemaVersion": 2, "config": ref("sha256:" + "cd" * 32), "layers": [ref()]}
    m.update(over)
    return json.dumps(m).encode()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "models")
    s.ensure()
    return s


def test_a_good_manifest_parses_and_lists_layers_then_config_once() -> None:
    m = parse_manifest(manifest(layers=[ref(), ref()]), "r")
    assert [r["digest"][7:9] for r in _refs(m)] == ["ab", "cd"]


@pytest.mark.parametrize(("raw", "words"), [
    (b"<html>hello</html>", "not a manifest"),
    (b"[1, 2]", "not a manifest"),
    (b"", "not a manifest"),
    (manifest(schemaVersion=1), "schemaVersion 1"),
    (manifest(layers="x"), "cannot use"),
    (manifest(manifests=[]), "manifest list"),
    (manifest(layers=[ref("sha256:../../etc/passwd")]), "invalid digest"),
    (manifest(layers=[ref("md5:" + "0" * 32)]), "invalid digest"),
    (manifest(layers=[ref(size=-1)]), "invalid size"),
    (manifest(layers=[ref(size=True)]), "invalid size"),
    (manifest(layers=[ref(size="10")]), "invalid size"),
    (manifest(layers=[ref(size=1 << 50)]), "invalid size"),
    (manifest(layers=[ref(media=5)]), "invalid mediaType"),
    (manifest(layers=["sha256:" + HEX]), "malformed layer 0"),
    (manifest(config=ref("sha256:/x")), "config with an invalid digest"),
])
def test_unusable_or_hostile_manifests_are_refused(raw: bytes, words: str) -> None:
    with pytest.raises(RegistryError) as e:
        parse_manifest(raw, "reg.example:5000")
    assert words in e.value.message and e.value.status == 502


def test_parts_are_planned_saved_and_resumed(store: Store) -> None:
    size = 98_362_432
    p = _Partial(store, HEX, size)
    fd = p.open()
    try:
        assert len(p.parts) == registry.PARTS
        assert [q.offset for q in p.parts] == [i * 24_590_608 for i in range(4)]
        assert sum(q.size for q in p.parts) == size
        p.parts[1].done = 1234
        p.save()
    finally:
        os.close(fd)
    again = _Partial(store, HEX, size)
    os_fd = again.open()
    try:
        assert again.completed == 1234 and again.parts[1].done == 1234
    finally:
        os.close(os_fd)


def test_small_blobs_are_one_part_and_empty_blobs_none(store: Store) -> None:
    assert [(q.offset, q.size) for q in _Partial(store, HEX, 5)._plan()] == [(0, 5)]
    assert _Partial(store, HEX, 0)._plan() == []


@pytest.mark.parametrize("state", ['{"size": 99, "parts": [[0, 99, 5]]}', "not json",
                                   '{"size": 10, "parts": [[0, 10, 11]]}', '{"size": 10, "parts": [[0, 4, 4]]}'])
def test_saved_state_that_does_not_fit_starts_over(store: Store, state: str) -> None:
    p = _Partial(store, HEX, 10)
    p.data.write_bytes(b"x" * 10)
    p.state.write_text(state)
    assert p._load() is None
    plan = p._plan()
    assert [(q.offset, q.size, q.done) for q in plan] == [(0, 10, 0)]
    assert not p.data.exists()  # stale bytes are never trusted


def test_discard_removes_both_files(store: Store) -> None:
    p = _Partial(store, HEX, 10)
    p.data.write_bytes(b"x")
    p.state.write_text("{}")
    p.discard()
    assert list(store.tmp.iterdir()) == []


def test_a_restart_keeps_recent_partials_and_drops_week_old_ones(store: Store) -> None:
    recent, old = _Partial(store, HEX, 10), _Partial(store, "cd" * 32, 10)
    for p in (recent, old):
        p.data.write_bytes(b"x")
        p.save()
    week = time.time() - 8 * 86400
    for path in (old.data, old.state):
        os.utime(path, (week, week))
    store.ensure()
    assert recent.data.exists() and recent.state.exists()
    assert not old.data.exists() and not old.state.exists()
