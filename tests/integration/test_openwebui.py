"""Open WebUI's first message, replayed byte for byte against a real node.

The requests in data/openwebui-0.12.4/ were captured between Open WebUI 0.12.4
(driven in Chromium, no account, its default settings) and a node, through a
recording proxy: the user's message as a stream with Open WebUI's 36 built-in
tools (it sends them with every chat, whatever the model), then the chat title
(num_predict 1000) and the follow-up suggestions, each a whole answer. The
first message of every Open WebUI user failed with "does not support tools"
before the bundled model had a tools-capable template (issue 14). Open WebUI
itself is not installed by the suite: it takes minutes and a gigabyte."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..conftest import NodeProc

DATA = Path(__file__).parent / "data" / "openwebui-0.12.4"


def send(node: NodeProc, name: str) -> tuple[int, list[dict[str, Any]]]:
    body = (DATA / f"{name}.json").read_bytes()
    req = urllib.request.Request(node.url + "/api/chat", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:  # liveness bound: a 1000-token title on a busy CPU
        return r.status, [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]


def test_openwebui_first_message_title_and_follow_ups(node: NodeProc) -> None:
    answer = json.loads((DATA / "answer.json").read_text())
    assert answer["stream"] is True and len(answer["tools"]) == 36  # the capture is what Open WebUI sends
    # Open WebUI sends the title while the answer may still stream: at once here.
    with ThreadPoolExecutor(3) as pool:
        names = ("answer", "title", "follow_ups")
        results = dict(zip(names, pool.map(lambda n: send(node, n), names), strict=True))
    for name, (status, lines) in results.items():
        assert status == 200, name
        assert not [line for line in lines if "error" in line], (name, lines[-3:])
        assert lines[-1]["done"] is True and lines[-1]["done_reason"] in ("stop", "length"), (name, lines[-1])
    status, chunks = results["answer"]
    assert len(chunks) > 2  # streamed, as asked
    said = "".join(c["message"].get("content", "") for c in chunks)
    calls = [call for c in chunks for call in c["message"].get("tool_calls", [])]
    assert said.strip() or calls  # an answer, or a call of one of the tools it was given
    offered = {t["function"]["name"] for t in answer["tools"]}
    assert all(call["function"]["name"] in offered for call in calls)
    for name in ("title", "follow_ups"):
        (only,) = results[name][1]
        assert only["message"]["role"] == "assistant" and only["message"]["content"].strip()
