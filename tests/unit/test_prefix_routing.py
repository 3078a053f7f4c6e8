"""Prefix-aware routing through the node's adverts and the Rust `Scheduler`
(issue 12, routing): the policy from config, the prompt text an entry node
routes on, warm prefixes in adverts (checked like every advert field), and
the decisions counted by reason."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_distributed import _core
from ollama_distributed.cluster import advert
from ollama_distributed.config import Config, load
from ollama_distributed.engines.base import CancelToken, InferenceRequest
from ollama_distributed.engines.mock import WARM_PROMPTS
from ollama_distributed.engines.prefix import canonical_text, routing_text
from ollama_distributed.errors import ConfigError
from ollama_distributed.models import names
from ollama_distributed.models.store import MODEL_MEDIA, layer
from ollama_distributed.node import Node

from .test_routing import FakeCluster, loaded, peer_b

MODEL = "m:latest"
# a Go template in the shape of the bundled model's
TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n")
SYSTEM = "You answer questions about the tenant's invoices. " * 40  # ~2,000 characters


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    cfg = Config()
    cfg.engine.kind = "mock"
    cfg.engine.mock_tokens = 2
    cfg.node.id = "a"
    cfg.node.data_dir = str(tmp_path)
    n = Node(cfg)
    n.store.ensure()
    digest, size = n.store.put_bytes(b"weights")
    n.store.write_manifest(names.parse(MODEL), [layer(MODEL_MEDIA, digest, size)], {"model_format": "gguf"})
    rec = n.store.get(MODEL)
    rec.template = TEMPLATE
    monkeypatch.setattr(n.store, "get", lambda name: rec)
    monkeypatch.setattr(n.engine, "loaded", lambda: loaded(MODEL))
    n.cluster = FakeCluster()
    return n


def chat(question: str) -> InferenceRequest:
    return InferenceRequest(kind="chat", model=MODEL, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def run(node: Node, req: InferenceRequest) -> None:
    async def go() -> None:
        async for _ in node.dispatcher.run_local(req, node.store.get(MODEL)):
            pass
    asyncio.run(go())


def test_policy_from_yaml_and_environment(tmp_path: Path) -> None:
    assert Config().scheduler.policy == "prefix_aware"
    f = tmp_path / "c.yaml"
    f.write_text("scheduler:\n  policy: round_robin\n")
    assert load(str(f), environ={"HOME": str(tmp_path)}).scheduler.policy == "round_robin"
    cfg = load(str(f), environ={"OLLAMA_DISTRIBUTED_SCHEDULER_POLICY": "least_loaded"})
    assert cfg.scheduler.policy == "least_loaded"
    with pytest.raises(ConfigError, match=r"scheduler\.policy: expected one of prefix_aware"):
        load(str(f), environ={"OLLAMA_DISTRIBUTED_SCHEDULER_POLICY": "fastest"})


def test_the_dispatcher_takes_the_policy_and_a_reload_changes_it(node: Node) -> None:
    assert node.dispatcher.scheduler.policy == "prefix_aware"
    cfg = Config()
    cfg.scheduler.policy = "round_robin"
    node.dispatcher.reconfigure(cfg)
    assert node.dispatcher.scheduler.policy == "round_robin"


def test_the_routing_text_is_the_rendered_prompt_when_the_template_is_go(node: Node) -> None:
    rec = node.store.get(MODEL)
    text = routing_text(chat("what is due?"), rec)
    assert text is not None
    assert text.startswith("<|im_start|>system\n" + SYSTEM)
    assert text.endswith("<|im_start|>user\nwhat is due?<|im_end|>\n<|im_start|>assistant\n")
    # without the record (a model only peers hold): the canonical text, with the same shared head
    canon = routing_text(chat("what is due?"), None)
    assert canon == canonical_text(chat("what is due?")) and canon.startswith("<system>" + SYSTEM)
    assert routing_text(InferenceRequest(kind="generate", model=MODEL, prompt="p", raw=True), rec) == "p"
    assert routing_text(InferenceRequest(kind="embed", model=MODEL, input=["x"]), rec) is None


def test_the_advert_carries_the_warm_prompts_of_both_texts_and_forgets_the_oldest(node: Node) -> None:
    assert node.advert()["prefix_hashes"] == []
    run(node, chat("first?"))
    rec = node.store.get(MODEL)
    hashes = set(node.advert()["prefix_hashes"])
    rendered = routing_text(chat("first?"), rec)
    assert rendered is not None
    assert set(_core.prefix_hashes(MODEL, rendered)) <= hashes
    assert set(_core.prefix_hashes(MODEL, canonical_text(chat("first?")))) <= hashes
    assert advert.check(node.advert())["prefix_hashes"] == node.advert()["prefix_hashes"]
    # the mock keeps WARM_PROMPTS prompts: other tenants' prompts push this one out
    for t in range(WARM_PROMPTS):
        run(node, InferenceRequest(kind="generate", model=MODEL, prompt=f"tenant {t} " * 100))
    hashes = set(node.advert()["prefix_hashes"])
    assert not set(_core.prefix_hashes(MODEL, rendered)) & hashes


def test_a_peer_advert_warm_prefixes_steer_the_request_to_it(node: Node) -> None:
    sched = node.dispatcher.scheduler
    prompt = canonical_text(chat("q"))
    node.cluster.peers = [peer_b(in_flight=0, loaded=[MODEL], prefix_hashes=_core.prefix_hashes(MODEL, prompt))]
    node._refresh_local_node()
    now = int(time.time() * 1000)
    assert sched.route(MODEL, now, prompt)[0] == "b"
    sched.dispatched("b")
    sched.finished("b")
    assert sched.routing_decisions() == {"prefix_hit": 1, "load": 0, "spread": 0}
    # the same peer's next advert says it is gone (restarted): the guess goes too
    node.cluster.peers = [peer_b(in_flight=0, loaded=[MODEL], prefix_hashes=[])]
    node.cluster.peers[0]["advert_at"] = time.time() + 5  # taken after the route above
    node._refresh_local_node()
    assert sched.route(MODEL, int(time.time() * 1000), prompt)[0] == "a"  # local wins the tie


@pytest.mark.parametrize("bad", ["x", [1, "2"], [-1], [2**64], [True], list(range(advert.MAX_PREFIX_HASHES + 1))])
def test_bad_prefix_hashes_are_refused(bad: Any) -> None:
    with pytest.raises(advert.BadAdvert) as e:
        advert.check({"prefix_hashes": bad})
    assert e.value.field == "prefix_hashes"


def test_an_advert_without_prefix_hashes_keeps_the_guess(node: Node) -> None:
    sched = node.dispatcher.scheduler
    prompt = canonical_text(chat("q"))
    node.cluster.peers = [peer_b(in_flight=0, loaded=[MODEL])]
    node._refresh_local_node()
    assert "prefix_hashes" not in advert.check(node.cluster.peers[0]["advert"])
    first = sched.route(MODEL, int(time.time() * 1000), prompt)[0]
    sched.dispatched(first)
    sched.finished(first)
    node.cluster.peers[0]["advert_at"] = time.time() + 5
    node._refresh_local_node()
    assert sched.route(MODEL, int(time.time() * 1000), prompt)[0] == first


def test_the_routing_decisions_metric(node: Node) -> None:
    from prometheus_client import generate_latest

    sched = node.dispatcher.scheduler
    node._refresh_local_node()
    sched.route(MODEL, int(time.time() * 1000), "p" * 200)
    sched.dispatched("a")
    node.cluster.status = lambda: None  # type: ignore[attr-defined]  # the cluster's own counters: none here
    text = generate_latest(node.metrics.registry).decode()
    assert 'ollama_distributed_routing_decisions_total{reason="load"} 1.0' in text
    assert 'ollama_distributed_routing_decisions_total{reason="spread"} 0.0' in text


def test_the_mock_run_records_the_prompt_it_was_given(node: Node) -> None:
    async def go() -> None:
        req = InferenceRequest(kind="generate", model=MODEL, prompt="hello " * 50, raw=True)
        async for _ in node.engine.generate(req, node.store.get(MODEL), 0, CancelToken()):
            pass
    asyncio.run(go())
    assert node.engine.warm_prompts() == {MODEL: ["hello " * 50]}


@pytest.mark.parametrize("req", [
    chat("what is due?"),
    InferenceRequest(kind="generate", model=MODEL, prompt="summarise", system="be brief"),
    InferenceRequest(kind="generate", model=MODEL, prompt="hello"),
    InferenceRequest(kind="chat", model=MODEL, messages=[{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"},
                                                         {"role": "user", "content": "again"}]),
], ids=["chat", "generate-system", "generate", "conversation"])
def test_the_routing_text_is_what_the_llamacpp_engine_renders(node: Node, req: InferenceRequest) -> None:
    """With a Go template the engine renders without the model (render_prompt
    reads nothing from the GGUF then), so the entry node's key and the engine's
    warm prompt (its rendered text) are the same string."""
    from ollama_distributed.engines.templates import render_prompt

    rec = node.store.get(MODEL)
    assert routing_text(req, rec) == render_prompt(None, rec, req).text


def test_the_routing_text_is_what_the_engine_renders_with_the_bundled_template(node: Node) -> None:
    from ollama_distributed.engines.templates import render_prompt
    from ollama_distributed.models.catalog import DEFAULT_TEMPLATE

    rec = node.store.get(MODEL)
    rec.template = DEFAULT_TEMPLATE
    tools = [{"type": "function", "function": {"name": "due", "description": "amount due",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for req in (chat("what is due?"), InferenceRequest(kind="chat", model=MODEL, tools=tools,
                                                        messages=[{"role": "user", "content": "due?"}])):
        assert routing_text(req, rec) == render_prompt(None, rec, req).text
