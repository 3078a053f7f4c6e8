"""Outbound requests a pull or push may make (SSRF), through a real node and
real registries on 127.0.0.1: models.registries is the list of hosts they may
reach, redirects included; link-local addresses are refused; a plain-HTTP token
realm needs `insecure`; error messages never carry the remote body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from ollama_distributed.models import outbound as reg

from ..conftest import NodeProc, start_node
from .test_registry import FakeRegistry, Server

SECRET = "internal-secret-3f9a"


@dataclass
class Hits:
    paths: list[str] = field(default_factory=list)


def counting(hits: Hits, answer: Any) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        hits.paths.append(request.path)
        return await answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An allowed registry (real models), an allowed one that redirects
    elsewhere, one that answers errors with a secret body, and one not allowed."""
    good = FakeRegistry()
    good.add("tiny:1", b"GGUF" + b"\0" * 60)
    elsewhere_hits = Hits()

    async def secret_page(request: web.Request) -> web.Response:
        return web.Response(text=f"metadata: {SECRET}")

    elsewhere = Server(counting(elsewhere_hits, secret_page))

    async def redirect(request: web.Request) -> web.Response:
        if request.path == "/v2/":
            return web.json_response({})
        raise web.HTTPTemporaryRedirect(f"http://{elsewhere.host}/latest/meta-data")

    async def leaky(request: web.Request) -> web.Response:
        if request.path == "/v2/":
            return web.json_response({})
        return web.Response(status=500, text=f"stack trace with {SECRET}")

    servers = {"good": Server(good.app()), "redirecting": Server(counting(Hits(), redirect)),
               "leaky": Server(counting(Hits(), leaky)), "elsewhere": elsewhere}
    tmp = tmp_path_factory.mktemp("ssrf")
    cfg = tmp / "c.yaml"
    allowed = [servers[k].host for k in ("good", "redirecting", "leaky")]
    cfg.write_text(json.dumps({"models": {"registries": allowed, "default": ""}}))
    node = start_node(tmp, "--config", str(cfg), "--engine", "mock", "--log-level", "warning")
    try:
        yield {"node": node, "elsewhere_hits": elsewhere_hits, **servers}
    finally:
        node.stop()
        for s in servers.values():
            s.close()


def pull(node: NodeProc, model: str) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", node.api_port, timeout=60)
    try:
        conn.request("POST", "/api/pull", json.dumps({"model": model, "insecure": True, "stream": False}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_an_allowed_registry_works(world: dict[str, Any]) -> None:
    status, out = pull(world["node"], f"{world['good'].host}/library/tiny:1")
    assert status == 200 and out["status"] == "success", out


def test_a_host_not_listed_is_refused_before_any_request(world: dict[str, Any]) -> None:
    hits = world["elsewhere_hits"]
    before = len(hits.paths)
    status, out = pull(world["node"], f"{world['elsewhere'].host}/library/tiny:1")
    assert status == 403 and "models.registries" in out["error"], out
    assert len(hits.paths) == before  # not even a connection's worth


def test_a_redirect_to_a_host_not_listed_is_not_followed(world: dict[str, Any]) -> None:
    hits = world["elsewhere_hits"]
    before = len(hits.paths)
    status, out = pull(world["node"], f"{world['redirecting'].host}/library/tiny:1")
    assert status == 403 and "redirect" in out["error"] and "models.registries" in out["error"], out
    assert len(hits.paths) == before
    assert SECRET not in json.dumps(out)


@pytest.mark.parametrize("host", ["169.254.169.254", "169.254.169.254:80", "169.254.0.1:5000"])
def test_link_local_addresses_are_refused(world: dict[str, Any], host: str) -> None:
    status, out = pull(world["node"], f"{host}/library/x:1")
    assert status == 403, out
    assert "link-local" in out["error"] or "models.registries" in out["error"], out


def test_error_messages_never_carry_the_remote_body(world: dict[str, Any]) -> None:
    status, out = pull(world["node"], f"{world['leaky'].host}/library/tiny:1")
    assert status == 502, out
    assert "500" in out["error"] and world["leaky"].host in out["error"]
    assert SECRET not in out["error"] and "stack trace" not in out["error"]


def test_without_a_list_link_local_is_still_refused(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--engine", "mock", "--log-level", "warning")
    try:
        status, out = pull(n, "169.254.169.254/latest/meta-data:1")
        assert status == 403 and "link-local" in out["error"], out
    finally:
        n.stop()


# The next two need addresses and TLS set-ups a test machine cannot have (a
# name that resolves to 169.254.x, an https registry), so they drive the
# guard's own pieces, with real sockets where there are any.


def test_a_plain_http_token_realm_needs_insecure() -> None:
    async def go(insecure: bool) -> str:
        async with aiohttp.ClientSession() as s:
            r = reg.Registry(s, "registry.example", insecure, reg.Policy())
            try:
                await r._authenticate('Bearer realm="http://127.0.0.1:9/token",service="x"')
            except reg.RegistryForbiddenError as e:
                return f"403 {e}"
            except reg.RegistryError as e:
                return f"502 {e}"
            return "ok"

    refused = asyncio.run(go(False))
    assert refused.startswith("403") and "plain-HTTP token realm" in refused
    assert asyncio.run(go(True)).startswith("502")  # allowed, then port 9 does not answer


def test_a_name_resolving_to_link_local_is_refused() -> None:
    class Fixed(aiohttp.abc.AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[Any]:
            return [{"hostname": host, "host": "169.254.169.254", "port": port, "family": 2, "proto": 0,
                     "flags": 0}]

        async def close(self) -> None:
            pass

    async def go(policy: reg.Policy) -> list[Any] | str:
        guarded = reg._GuardedResolver(policy)
        guarded._inner = Fixed()  # type: ignore[assignment]
        try:
            return await guarded.resolve("metadata.example", 80)
        except OSError as e:
            return str(e)

    assert "link-local" in str(asyncio.run(go(reg.Policy())))
    assert not reg.Policy().ip_allowed("fe80::1") and not reg.Policy().ip_allowed("fe80::1%eth0")
    assert reg.Policy(["[fe80::1]"]).ip_allowed("fe80::1") and reg.Policy().ip_allowed("10.0.0.1")
    assert asyncio.run(go(reg.Policy(["169.254.169.254"])))[0]["host"] == "169.254.169.254"  # type: ignore[index]
    with pytest.raises(reg.RegistryForbiddenError):
        reg.Policy(["registry.example"]).check(yarl.URL("https://other.example/v2/"), "a pull")
    reg.Policy(["registry.example"]).check(yarl.URL("https://registry.example:5000/v2/"), "a pull")
    with pytest.raises(reg.RegistryForbiddenError):
        reg.Policy(["registry.example:5000"]).check(yarl.URL("https://registry.example:5001/v2/"), "a pull")
