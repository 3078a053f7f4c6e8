"""The official `ollama` Python client against a real node and the real engine."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ollama
import pytest

from ..conftest import MODEL, NodeProc

OPTS = {"num_predict": 12, "temperature": 0, "seed": 42}


@pytest.fixture(scope="module")
def client(node: NodeProc) -> ollama.Client:
    return ollama.Client(host=node.url, timeout=120)


def test_list_show_ps(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert MODEL in names
    shown = client.show(MODEL)
    assert shown.details.family == "llama"
    assert shown.details.quantization_level == "Q4_1"
    assert shown.modelinfo["general.architecture"] == "llama"
    assert "completion" in shown.capabilities
    assert "<|im_start|>" in shown.template  # the GGUF's own chat template
    client.generate(MODEL, "", keep_alive="10m")  # empty prompt loads
    assert MODEL in [m.model for m in client.ps().models]


def test_generate_stream_and_not(client: ollama.Client) -> None:
    full = client.generate(MODEL, "Name a colour.", options=OPTS)
    assert full.done and full.response.strip()
    assert full.eval_count and full.eval_count <= 12
    assert full.prompt_eval_count and full.prompt_eval_count > 3
    for stat in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert getattr(full, stat) > 0, stat
    assert full.done_reason in ("stop", "length")
    parts = list(client.generate(MODEL, "Name a colour.", options=OPTS, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == full.response  # same seed, temperature 0


def test_chat_several_turns(client: ollama.Client) -> None:
    msgs = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is 2 + 2?"}]
    first = client.chat(MODEL, messages=msgs, options=OPTS)
    assert first.message.role == "assistant" and first.message.content.strip()
    msgs += [{"role": "assistant", "content": first.message.content},
             {"role": "user", "content": "And 3 + 3?"}]
    second = client.chat(MODEL, messages=msgs, options=OPTS)
    assert second.prompt_eval_count > first.prompt_eval_count  # the history was sent to the model
    streamed = "".join(c.message.content for c in client.chat(MODEL, messages=msgs, options=OPTS,
                                                                  stream=True))
    assert streamed == second.message.content


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    r = client.embed(MODEL, input=["hello world", "goodbye moon"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 576
    norm = sum(x * x for x in r.embeddings[0]) ** 0.5
    assert abs(norm - 1.0) < 1e-3  # /api/embed normalises
    assert r.embeddings[0] != r.embeddings[1]
    legacy = client.embeddings(MODEL, prompt="hello world")
    assert len(legacy.embedding) == 576
    assert abs(sum(x * x for x in legacy.embedding) ** 0.5 - 1.0) > 1e-3  # legacy does not


def test_create_blob_create_copy_delete(client: ollama.Client, node: NodeProc, tmp_path: Path) -> None:
    blob = next((node.data_dir / "models" / "blobs").glob("sha256-b179*"))
    gguf = tmp_path / "copy.gguf"
    gguf.write_bytes(blob.read_bytes())
    digest = client.create_blob(gguf)
    assert digest == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    progress = list(client.create(model="mine:v1", files={"copy.gguf": digest},
                                  system="You are a pirate.", parameters={"temperature": 0.1},
                                  stream=True))
    assert progress[-1].status == "success"
    shown = client.show("mine:v1")
    assert 'SYSTEM """You are a pirate."""' in shown.modelfile
    assert "temperature" in shown.parameters
    client.create(model="mine:v2", from_="mine:v1", system="You are a cat.")
    assert 'SYSTEM """You are a cat."""' in client.show("mine:v2").modelfile
    client.copy("mine:v2", "mine:v3")
    names = [m.model for m in client.list().models]
    assert {"mine:v1", "mine:v2", "mine:v3"} <= set(names)
    out = client.generate("mine:v3", "Hi", options={"num_predict": 4})
    assert out.done
    for n in ("mine:v1", "mine:v2", "mine:v3"):
        client.delete(n)
    names = [m.model for m in client.list().models]
    assert not {"mine:v1", "mine:v2", "mine:v3"} & set(names)
    with pytest.raises(ollama.ResponseError) as e:
        client.show("mine:v1")
    assert e.value.status_code == 404


def test_unknown_model_is_404_with_ollama_wording(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.generate("no-such-model", "hi")
    assert e.value.status_code == 404
    assert "model 'no-such-model' not found" in e.value.error
