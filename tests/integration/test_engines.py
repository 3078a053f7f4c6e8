"""Engines behind one interface: upstream OpenAI (llama_cpp.server), upstream
Ollama (a second node of ours), the mock, and llama.cpp's options."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
from ollama_distributed.models.catalog import find_default_gguf

from ..conftest import MODEL, NodeProc, free_port, start_node


def post(url: str, obj: Any, timeout: float = 120) -> Any:
    req = urllib.request.Request(url, data=json.dumps(obj).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gguf = find_default_gguf()
    assert gguf is not None
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "upstream-smol",
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--embedding", "false"],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_openai_upstream(llama_server: str, tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "openai", "--upstream", llama_server)
    try:
        c = ollama.Client(host=n.url, timeout=120)
        assert [m.model for m in c.list().models] == ["upstream-smol"]
        r = c.generate("upstream-smol", "Say hello.", options={"num_predict": 6, "temperature": 0})
        assert r.response.strip() and r.done
        assert r.eval_count and r.eval_count <= 6
        chat = "".join(x.message.content for x in c.chat(
            "upstream-smol", messages=[{"role": "user", "content": "Hi"}], stream=True,
            options={"num_predict": 6}))
        assert chat.strip()
        oa = openai.OpenAI(base_url=n.url + "/v1", api_key="x", max_retries=0)
        done = oa.chat.completions.create(model="upstream-smol", max_tokens=5,
                                          messages=[{"role": "user", "content": "Hi"}])
        assert done.choices[0].message.content
        with pytest.raises(ollama.ResponseError) as e:
            c.generate("not-upstream", "x")
        assert e.value.status_code == 404
    finally:
        n.stop()


def test_ollama_upstream_is_another_node(node: NodeProc, tmp_path: Path) -> None:
    before = node.get("/api/distributed/metrics")["requests_processed"]  # type: ignore[index]
    n = start_node(tmp_path, "--engine", "ollama", "--upstream", node.url)
    try:
        c = ollama.Client(host=n.url, timeout=120)
        assert MODEL in [m.model for m in c.list().models]
        opts = {"num_predict": 8, "temperature": 0, "seed": 3}
        via = c.generate(MODEL, "Name a fruit.", options=opts)
        direct = ollama.Client(host=node.url).generate(MODEL, "Name a fruit.", options=opts)
        assert via.response == direct.response
        assert via.eval_count == direct.eval_count
        msgs = [{"role": "user", "content": "Hi"}]
        assert c.chat(MODEL, messages=msgs, options=opts).message.content
        assert len(c.embed(MODEL, input="x").embeddings[0]) == 576
        after = node.get("/api/distributed/metrics")["requests_processed"]  # type: ignore[index]
        assert after - before >= 4  # the upstream node did the work
    finally:
        n.stop()


def test_mock_engine_streams_the_configured_tokens(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", env={"OLLAMA_DISTRIBUTED_ENGINE_MOCK_TTFT_MS": "200"})
    try:
        t0 = time.monotonic()
        r = ollama.Client(host=n.url).generate(MODEL, "x", options={"num_predict": 5})
        assert time.monotonic() - t0 >= 0.2
        assert r.eval_count == 5 and len(r.response.split()) == 5
    finally:
        n.stop()


def test_keep_alive_load_and_unload(node: NodeProc) -> None:
    c = ollama.Client(host=node.url, timeout=120)
    r = c.generate(MODEL, "", keep_alive="10m")
    assert r.done_reason == "load"
    ps = {m.model: m for m in c.ps().models}
    assert MODEL in ps
    r = c.generate(MODEL, "", keep_alive=0)
    assert r.done_reason == "unload"
    assert MODEL not in [m.model for m in c.ps().models]
    c.generate(MODEL, "Hi", options={"num_predict": 1}, keep_alive=0)  # runs, then unloads
    assert MODEL not in [m.model for m in c.ps().models]
    c.generate(MODEL, "Hi", options={"num_predict": 1}, keep_alive=-1)
    [loaded] = [m for m in c.ps().models if m.model == MODEL]
    assert loaded.expires_at is not None and loaded.expires_at.year == 1  # forever, as Ollama shows it


def test_options_are_honoured(node: NodeProc) -> None:
    gen = node.url + "/api/generate"
    base = {"model": MODEL, "stream": False}
    out = post(gen, {**base, "prompt": "List three colours, one per line.",
                     "options": {"num_predict": 30, "temperature": 0, "stop": ["\n"]}})
    assert "\n" not in out["response"]
    # seeded: evaluated whole (no warm prefix), so prompt_eval_count is each prompt's length
    raw = post(gen, {**base, "prompt": "1, 2, 3, 4,", "raw": True,
                     "options": {"num_predict": 4, "temperature": 0, "seed": 1}})
    templated = post(gen, {**base, "prompt": "1, 2, 3, 4,", "options": {"num_predict": 4, "temperature": 0,
                                                                        "seed": 1}})
    assert raw["prompt_eval_count"] < templated["prompt_eval_count"]  # no chat template around it
    a = post(gen, {**base, "prompt": "Tell me a word.", "options": {"num_predict": 8, "temperature": 1.5, "seed": 11}})
    b = post(gen, {**base, "prompt": "Tell me a word.", "options": {"num_predict": 8, "temperature": 1.5, "seed": 11}})
    assert a["response"] == b["response"]  # same seed, same text, even when sampling
    small = post(gen, {**base, "prompt": "Hi", "options": {"num_predict": 2, "num_ctx": 256}})
    assert small["done"]
    ps = post(node.url + "/api/show", {"model": MODEL})
    assert ps["details"]["family"] == "llama"


def test_format_json_and_schema(node: NodeProc) -> None:
    gen = node.url + "/api/generate"
    out = post(gen, {"model": MODEL, "prompt": "Give a JSON object with a key a set to 1.", "stream": False,
                     "format": "json", "options": {"num_predict": 40, "temperature": 0}})
    assert out["response"].lstrip().startswith("{")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = post(gen, {"model": MODEL, "prompt": "Pick a number.", "stream": False, "format": schema,
                     "options": {"num_predict": 40, "temperature": 0}})
    parsed = json.loads(out["response"])
    assert isinstance(parsed["n"], int)
