"""The agents' fields cross the QUIC hop: a model only b holds, asked for at a
with logprobs, think, tools, tool_choice and a tool round trip, on the mock
engine (which answers each of them only when it sees it: engines/mock.py)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import pytest

from ..conftest import MODEL, start_node
from .test_nodes import converged, join_args, metric, post, step, token_of, until

pytestmark = pytest.mark.cluster

ENV = {"OLLAMA_DISTRIBUTED_MODELS_REPLICAS": "1", "OLLAMA_DISTRIBUTED_ENGINE_MOCK_TOKENS": "4"}
WEATHER = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                   "required": ["city"]}}


def test_new_fields_survive_forwarding(tmp_path: Path) -> None:
    a = start_node(tmp_path, "--engine", "mock", data_dir=tmp_path / "a", env=ENV)
    b = start_node(tmp_path, "--engine", "mock", *join_args(a, token_of(a)), data_dir=tmp_path / "b", env=ENV)
    try:
        until("two nodes", 30, lambda: converged([a, b], 2))
        step("a model only b holds")
        post(b.url + "/api/copy", {"source": MODEL, "destination": "b-only"})
        until("a lists b-only", 10, lambda: "b-only:latest" in [
            m["name"] for m in a.get("/api/tags")["models"]])  # type: ignore[index]
        time.sleep(2.0)  # a's scheduler takes peers' adverts about once a second

        def served_at_b() -> float:
            return sum(metric(b, "ollama_distributed_requests_total", endpoint=f"peer:{kind}")
                       for kind in ("generate", "chat"))

        step("logprobs through a")
        before = served_at_b()
        out: dict[str, Any] = post(a.url + "/api/generate", {"model": "b-only", "prompt": "x", "stream": False,
                                                             "logprobs": True, "top_logprobs": 3})
        assert len(out["logprobs"]) == 4 and all(len(e["top_logprobs"]) == 3 for e in out["logprobs"])
        assert served_at_b() == before + 1, "b must have done the work"

        step("think, tools and tool_choice through a, with Anthropic's client")
        c = anthropic.Anthropic(base_url=a.url, api_key="x", max_retries=0)
        tools: Any = [WEATHER, {**WEATHER, "name": "get_time"}]
        ask = [{"role": "user", "content": "Time?"}]
        msg = c.messages.create(model="b-only", max_tokens=8, tools=tools, messages=ask,  # type: ignore[arg-type]
                                tool_choice={"type": "tool", "name": "get_time"},
                                thinking={"type": "enabled", "budget_tokens": 1024})
        assert [x.type for x in msg.content] == ["thinking", "tool_use"]
        use = msg.content[1]
        assert use.name == "get_time" and use.input == {"city": "mock"}  # type: ignore[union-attr]

        step("the tool's answer through a: the tool message reaches b")
        answer = c.messages.create(model="b-only", max_tokens=3, tools=tools, messages=[  # type: ignore[arg-type]
            *ask, {"role": "assistant", "content": [x.model_dump() for x in msg.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "noon"}]}])
        assert [x.type for x in answer.content] == ["text"] and answer.stop_reason == "max_tokens"
        assert served_at_b() == before + 3

        step("the same, streamed over SSE through a")
        with c.messages.stream(model="b-only", max_tokens=8, tools=tools, messages=ask) as s:  # type: ignore[arg-type]
            final = s.get_final_message()
        assert final.stop_reason == "tool_use" and final.content[-1].name == "get_weather"  # type: ignore[union-attr]

        step("an Ollama chat with logprobs through a")
        req = urllib.request.Request(a.url + "/api/chat", data=json.dumps({
            "model": "b-only", "stream": False, "logprobs": True, "messages": [{"role": "user", "content": "x"}],
        }).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            chat = json.loads(r.read())
        assert len(chat["logprobs"]) == 4
    finally:
        a.stop()
        b.stop()
