"""A tool round trip through a forwarding hop: the model only b holds, asked at
a; tools, tool_choice, the call and the tool result cross QUIC both ways."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from ..conftest import MODEL, start_node
from ..integration.test_agents import OPTS, QUESTION, RESULT, TOOLS
from .test_nodes import (  # noqa: F401  (models_stay_where_they_are: an autouse fixture)
    converged,
    join_args,
    metric,
    models_stay_where_they_are,
    post,
    step,
    token_of,
    until,
)

pytestmark = pytest.mark.cluster


def test_tool_round_trip_through_a_forwarding_hop(tmp_path: Path) -> None:
    a = start_node(tmp_path, data_dir=tmp_path / "a")
    b = None
    try:
        b = start_node(tmp_path, *join_args(a, token_of(a)), data_dir=tmp_path / "b")
        until("two nodes, one leader", 30, lambda: converged([a, b], 2))
        step("a model only b holds")
        post(b.url + "/api/copy", {"source": MODEL, "destination": "only-b"})
        until("a lists only-b", 10, lambda: "only-b:latest" in [m["name"] for m in a.get("/api/tags")["models"]])  # type: ignore[index]
        time.sleep(2.0)  # a's scheduler takes peers' adverts about once a second
        step("at a: the model calls get_weather (at b)")
        first: dict[str, Any] = {}

        def ask() -> bool:
            try:
                first["out"] = post(a.url + "/api/chat", {
                    "model": "only-b", "messages": [QUESTION], "tools": TOOLS, "tool_choice": "required",
                    "stream": False, "options": OPTS}, timeout=300)
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
                return False
            return True

        until("a routes only-b", 10, ask)
        calls = first["out"]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert isinstance(calls[0]["function"]["arguments"]["city"], str)
        step("at a: the result as role tool, the model answers (at b)")
        msgs = [QUESTION, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": RESULT, "tool_call_id": calls[0]["id"]}]
        second = post(a.url + "/api/chat", {"model": "only-b", "messages": msgs, "tools": TOOLS,
                                            "stream": False, "options": OPTS}, timeout=300)
        assert second["done"] and (second["message"]["content"].strip() or second["message"].get("tool_calls"))
        assert second["prompt_eval_count"] > first["out"]["prompt_eval_count"] + 20
        assert metric(b, "ollama_distributed_requests_total", endpoint="peer:chat", model="only-b:latest") == 2
    finally:
        for n in (a, b):
            if n is not None:
                n.stop()
