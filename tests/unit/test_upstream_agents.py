"""The upstream engines pass the agents' fields through unchanged and read
thinking, tool calls and logprobs back from the upstream's stream, against an
in-process stand-in of Ollama's /api/chat and OpenAI's /v1/chat/completions
(a real upstream that calls tools is not bundled)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from ollama_distributed.config import EngineSection
from ollama_distributed.engines.base import CancelToken, InferenceRequest
from ollama_distributed.engines.upstream import OllamaUpstreamEngine, OpenAIUpstreamEngine

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
HISTORY = [
    {"role": "user", "content": "x?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_9", "function": {"index": 0, "name": "f",
                                                                                      "arguments": {"x": 1}}}]},
    {"role": "tool", "content": "2", "tool_call_id": "call_9"},
]


def ollama_lines() -> str:
    lines = [
        {"message": {"role": "assistant", "content": "", "thinking": "hmm"}, "done": False},
        {"message": {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}}]}, "done": False},
        {"message": {"role": "assistant", "content": "hi"}, "done": False,
         "logprobs": [{"token": "hi", "logprob": -0.1, "bytes": [104, 105]}]},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop", "eval_count": 3},
    ]
    return "".join(json.dumps(x) + "\n" for x in lines)


def openai_events() -> str:
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "hmm"}}]},
        {"choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": {"content": [
            {"token": "hi", "logprob": -0.1, "bytes": [104, 105],
             "top_logprobs": [{"token": "hi", "logprob": -0.1, "bytes": [104, 105]}]}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                           "function": {"name": "f", "arguments": '{"x"'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                      "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
    ]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


async def _run(engine_cls: Any, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen: dict[str, Any] = {}

    async def chat(request: web.Request) -> web.Response:
        seen.update(await request.json())
        return web.Response(text=ollama_lines(), content_type="application/x-ndjson")

    async def completions(request: web.Request) -> web.Response:
        seen.update(await request.json())
        return web.Response(text=openai_events(), content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    engine = engine_cls(EngineSection(kind=kind, upstream=f"http://127.0.0.1:{port}"))
    await engine.start()
    try:
        req = InferenceRequest(kind="chat", model="m", messages=HISTORY, tools=TOOLS, tool_choice="required",
                               think="high", logprobs=True, top_logprobs=2, shift=False)
        chunks = [c async for c in engine.generate(req, None, 0, CancelToken())]
    finally:
        await engine.stop()
        await runner.cleanup()
    return seen, chunks


def test_ollama_upstream_passes_the_fields_and_reads_them_back() -> None:
    seen, chunks = asyncio.run(_run(OllamaUpstreamEngine, "ollama"))
    assert seen["tools"] == TOOLS and seen["think"] == "high" and seen["messages"] == HISTORY
    assert seen["logprobs"] is True and seen["top_logprobs"] == 2 and seen["shift"] is False
    assert chunks[:3] == [
        {"thinking": "hmm"},
        {"tool_calls": [{"id": "call_1", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}}]},
        {"text": "hi", "logprobs": [{"token": "hi", "logprob": -0.1, "bytes": [104, 105]}]},
    ]
    assert chunks[-1]["done"] is True and len(chunks) == 4


def test_openai_upstream_passes_the_fields_and_reads_them_back() -> None:
    seen, chunks = asyncio.run(_run(OpenAIUpstreamEngine, "openai"))
    assert seen["tools"] == TOOLS and seen["tool_choice"] == "required" and seen["reasoning_effort"] == "high"
    assert seen["logprobs"] is True and seen["top_logprobs"] == 2
    # Ollama-shaped history as OpenAI's: arguments as a JSON string, the tool's call id kept
    assert seen["messages"][1]["tool_calls"] == [{"id": "call_9", "type": "function",
                                                  "function": {"name": "f", "arguments": '{"x": 1}'}}]
    assert seen["messages"][2] == {"role": "tool", "content": "2", "tool_call_id": "call_9"}
    assert chunks[0] == {"thinking": "hmm"}
    assert chunks[1] == {"text": "hi", "logprobs": [{"token": "hi", "logprob": -0.1, "bytes": [104, 105],
                                                     "top_logprobs": [{"token": "hi", "logprob": -0.1,
                                                                       "bytes": [104, 105]}]}]}
    # fragments joined into one call with its arguments parsed
    assert chunks[2] == {"tool_calls": [{"id": "call_1", "function": {"index": 0, "name": "f",
                                                                      "arguments": {"x": 1}}}]}
    assert chunks[3]["done"] is True and chunks[3]["eval_count"] == 3
