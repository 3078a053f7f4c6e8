"""A model's life cycle never frees what is in use (issue 10), on the real
llama.cpp engine: `ollama stop` (keep_alive 0), /api/delete and an embedding
batch in flight all let the work under way finish, then unload; nothing
crashes the node. And inputs llama.cpp would choke on are 400s, not crashes."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import MODEL, NodeProc, start_node


@pytest.fixture(scope="module")
def node2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """A node of its own (these tests unload and delete), two slots per model."""
    n = start_node(tmp_path_factory.mktemp("lifecycle"), env={"OLLAMA_DISTRIBUTED_ENGINE_NUM_PARALLEL": "2"})
    yield n
    n.stop()


def post(n: NodeProc, path: str, obj: Any, timeout: float = 120) -> Any:
    req = urllib.request.Request(n.url + path, data=json.dumps(obj).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body.strip() else None


def loaded(n: NodeProc) -> list[str]:
    return [m["name"] for m in n.get("/api/ps")["models"]]  # type: ignore[index]


def stream_with(n: NodeProc, model: str, during: Any) -> list[dict[str, Any]]:
    """Stream a long generation; after its third chunk, call `during()`."""
    body = json.dumps({"model": model, "prompt": "Write a long story about a robot.",
                       "options": {"num_predict": 120, "temperature": 0}}).encode()
    chunks: list[dict[str, Any]] = []
    with urllib.request.urlopen(urllib.request.Request(n.url + "/api/generate", data=body), timeout=300) as r:
        for line in r:
            chunks.append(json.loads(line))
            if len(chunks) == 3:
                during()
    return chunks


def assert_alive(n: NodeProc) -> None:
    assert n.proc.poll() is None, n.log()[-3000:]
    out = post(n, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False,
                                    "options": {"num_predict": 4}})
    assert out["done"] is True and out["eval_count"] > 0


def test_ollama_stop_mid_generation_lets_it_finish_then_unloads(node2: NodeProc) -> None:
    answers: list[Any] = []
    chunks = stream_with(node2, MODEL, lambda: answers.append(
        post(node2, "/api/generate", {"model": MODEL, "keep_alive": 0})))
    assert answers[0]["done_reason"] == "unload"
    final = chunks[-1]
    assert final.get("done") is True and "error" not in final, final
    assert final["eval_count"] > 3  # it went on after the stop
    assert MODEL not in loaded(node2)
    assert_alive(node2)


def test_chat_unload_during_generation_and_a_new_request_meanwhile(node2: NodeProc) -> None:
    side: list[Any] = []

    def during() -> None:
        side.append(post(node2, "/api/chat", {"model": MODEL, "messages": [], "keep_alive": 0}))
        # new work while the old instance drains: served by a fresh load
        side.append(post(node2, "/api/chat", {"model": MODEL, "stream": False, "options": {"num_predict": 3},
                                              "messages": [{"role": "user", "content": "Hi"}]}))

    chunks = stream_with(node2, MODEL, during)
    assert side[0]["done_reason"] == "unload" and side[1]["done"] is True
    assert chunks[-1].get("done") is True, chunks[-1]
    assert_alive(node2)


def test_delete_mid_generation(node2: NodeProc) -> None:
    post(node2, "/api/copy", {"source": MODEL, "destination": "victim"})
    deleted: list[int] = []

    def delete() -> None:
        req = urllib.request.Request(node2.url + "/api/delete", data=json.dumps({"model": "victim"}).encode(),
                                     method="DELETE")
        with urllib.request.urlopen(req, timeout=60) as r:
            deleted.append(r.status)

    chunks = stream_with(node2, "victim", delete)
    assert deleted == [200]
    assert chunks[-1].get("done") is True, chunks[-1]
    assert "victim:latest" not in loaded(node2)
    with pytest.raises(urllib.error.HTTPError) as e:
        post(node2, "/api/generate", {"model": "victim", "prompt": "x"})
    assert e.value.code == 404
    assert_alive(node2)


def test_unload_while_embedding(node2: NodeProc) -> None:
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(
        post(node2, "/api/embed", {"model": MODEL, "input": [f"sentence number {i}" for i in range(64)]})))
    t.start()
    time.sleep(0.3)
    for _ in range(5):
        post(node2, "/api/embed", {"model": MODEL, "input": [], "keep_alive": 0})
        time.sleep(0.1)
    t.join(120)
    assert len(result[0]["embeddings"]) == 64
    assert_alive(node2)


@pytest.mark.parametrize("obj,needle", [
    ({"prompt": "hi", "context": [1, 2, 10**9]}, "outside this model's vocabulary"),
    ({"prompt": "hi", "context": [-1]}, "outside this model's vocabulary"),
    ({"prompt": "word " * 400, "truncate": False, "options": {"num_ctx": 128}}, "exceeds the context length"),
])
def test_inputs_the_engine_would_choke_on_are_400(node2: NodeProc, obj: dict[str, Any], needle: str) -> None:
    for stream in (False, True):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(node2, "/api/generate", {"model": MODEL, "stream": stream, **obj})
        assert e.value.code == 400
        assert needle in json.loads(e.value.read())["error"]
    assert_alive(node2)


@pytest.mark.parametrize("obj,needle", [
    ({"prompt": "hi", "options": {"num_ctx": -5}}, "option num_ctx must be 0 or more"),
    ({"prompt": "hi", "options": {"num_predict": -7}}, "option num_predict must be -2 or more"),
    ({"prompt": "", "raw": True}, "nothing to generate from"),
])
def test_options_and_prompts_out_of_range_are_400(node2: NodeProc, obj: dict[str, Any], needle: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        post(node2, "/api/generate", {"model": MODEL, "stream": False, **obj})
    assert e.value.code == 400 and needle in json.loads(e.value.read())["error"]
    assert_alive(node2)


def test_a_lone_surrogate_is_400_and_a_real_pair_is_fine(node2: NodeProc) -> None:
    raw = b'{"model": "smollm2:135m", "stream": false, "prompt": "\\ud800 hi", "options": {"num_predict": 2}}'
    req = urllib.request.Request(node2.url + "/api/generate", data=raw, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "surrogate" in json.loads(e.value.read())["error"]
    out = post(node2, "/api/generate", {"model": MODEL, "prompt": "\U0001F600 hi", "stream": False,
                                        "options": {"num_predict": 2}})
    assert out["done"] is True


def test_a_huge_num_ctx_is_cut_to_what_the_model_was_trained_for(node2: NodeProc) -> None:
    # llama.cpp would try to allocate it for a minute, fail, and every later request failed too
    out = post(node2, "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False,
                                        "options": {"num_ctx": 10**9, "num_predict": 2}})
    assert out["done"] is True
    ctx = [m["context_length"] for m in node2.get("/api/ps")["models"] if m["name"] == MODEL]  # type: ignore[index]
    assert ctx == [8192], ctx
    assert_alive(node2)


def test_embedding_inputs_that_broke_the_engine(node2: NodeProc) -> None:
    for bad in ([""], ["a", ""]):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(node2, "/api/embed", {"model": MODEL, "input": bad})
        assert e.value.code == 400 and "nothing to embed" in json.loads(e.value.read())["error"]
    # the embedding context is still usable (a failed decode used to leave it unsafe to free)
    assert len(post(node2, "/api/embed", {"model": MODEL, "input": ["a"]})["embeddings"]) == 1
    # an input longer than llama-cpp-python's default batch (512) but inside the context
    long = " ".join(["word"] * 700)
    out = post(node2, "/api/embed", {"model": MODEL, "input": [long], "truncate": False,
                                     "options": {"num_ctx": 2048}})
    assert len(out["embeddings"][0]) > 0
    # a context that is not a multiple of 256 aborted llama.cpp's embedding (GGML_ASSERT)
    for num_ctx in (300, 1000, 1):
        out = post(node2, "/api/embed", {"model": MODEL, "input": ["b"], "options": {"num_ctx": num_ctx}})
        assert len(out["embeddings"]) == 1
    assert_alive(node2)
