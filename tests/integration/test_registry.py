"""Registry pull and push with Ollama's protocol, against a real distribution v2
registry (Debian's docker-registry) started here on a free 127.0.0.1 port, and
against tiny aiohttp registries that misbehave on purpose (garbage, a wrong
digest, a token realm, a connection cut mid-layer, a layer corrupted once on
the way)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from aiohttp import ClientSession, web

from ..conftest import CLI, MODEL, NodeProc, free_port, start_node

GGUF_PREFIX = "sha256-b179c952"
PART_STARTS = {i * 24590608 for i in range(4)}  # the GGUF layer in 4 parts of ceil(98362432 / 4)
STALL = 8 << 20  # bytes of each part sent before the proxy hangs
SESSION = web.AppKey("session", ClientSession)


# ---- helpers ---------------------------------------------------------------------------------


@dataclass
class RegistryProc:
    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"



def model_parts(ranges: list[str]) -> list[str]:
    """The Range requests for the model layer's parts (1 MiB and more), not the
    small layers (params, template) fetched whole."""
    out = []
    for r in ranges:
        if r and r.startswith("bytes="):
            start, end = r.removeprefix("bytes=").split("-")
            if int(end) - int(start) >= 1 << 20:
                out.append(r)
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProc]:
    exe = shutil.which("docker-registry")
    if exe is None:  # scripts/apt-deps.sh installs it; `make test` runs that first
        pytest.fail("docker-registry is missing: run scripts/apt-deps.sh (Debian's docker-registry package)")
    tmp = tmp_path_factory.mktemp("registry")
    port = free_port()
    cfg = tmp / "config.yml"
    cfg.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: test-only\n")
    log = tmp / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    reg = RegistryProc(proc, port, tmp / "storage", log)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"docker-registry did not start:\n{log.read_text()}") from None
            time.sleep(0.1)
    yield reg
    proc.terminate()
    proc.wait(10)


def no_default_node(tmp: Path, *args: str) -> NodeProc:
    """A node that registers no bundled model, so whatever it has, it pulled."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "config.yaml"
    cfg.write_text('models:\n  default: ""\n')
    return start_node(tmp, "--config", str(cfg), *args)


class Server:
    """An aiohttp app on a free 127.0.0.1 port, served from a thread of its own."""

    def __init__(self, app: web.Application) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def statuses(events: list[Any]) -> list[str]:
    return [e["status"] for e in events]


def store_files(node: NodeProc) -> dict[str, bytes]:
    blobs = node.data_dir / "models" / "blobs"
    return {p.name: p.read_bytes() for p in blobs.glob("sha256-*")}


def tmp_files(node: NodeProc) -> list[str]:
    return sorted(p.name for p in (node.data_dir / "models" / "tmp").iterdir())


def tags(node: NodeProc) -> list[str]:
    return [m["name"] for m in node.get("/api/tags")["models"]]  # type: ignore[index]


def check_progress(events: list[Any], verb: str) -> None:
    """Every per-layer line is Ollama's shape, and each layer ends complete."""
    last: dict[str, tuple[int, int]] = {}
    for e in events:
        if e.get("digest"):
            assert e["status"] == f"{verb} {e['digest'][7:19]}", e
            assert 0 <= e["completed"] <= e["total"], e
            prev = last.get(e["digest"], (0, e["total"]))
            assert e["completed"] >= prev[0] and e["total"] == prev[1], (prev, e)
            last[e["digest"]] = (e["completed"], e["total"])
    assert last and all(c == t for c, t in last.values()), last


# ---- the round trip ---------------------------------------------------------------------------


def test_push_then_pull_on_a_fresh_node(node: NodeProc, registry: RegistryProc, tmp_path: Path) -> None:
    name = f"{registry.host}/library/smollm2:135m"
    pusher = ollama.Client(host=node.url)
    pusher.copy(MODEL, name)

    print("=== push without insecure: the plain-HTTP registry is refused clearly")
    with pytest.raises(ollama.ResponseError) as refused:
        list(pusher.push(name, stream=True))
    assert refused.value.status_code == 502
    assert "does not speak https" in str(refused.value) and "insecure" in str(refused.value)

    print("=== push with insecure")
    events = [e.model_dump(exclude_none=True) for e in pusher.push(name, insecure=True, stream=True)]
    s = statuses(events)
    assert s[0] == "retrieving manifest" and s[-2:] == ["pushing manifest", "success"], s
    check_progress(events, "pushing")
    gguf = next(b for b in store_files(node) if b.startswith(GGUF_PREFIX))
    req = urllib.request.Request(f"http://{registry.host}/v2/library/smollm2/blobs/{gguf.replace('-', ':', 1)}",
                                 method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert int(r.headers["Content-Length"]) == 98362432

    print("=== a second push finds every blob in place (`models push`, bars on stderr)")
    r = subprocess.run([*CLI, "models", "push", "--insecure", name, "--api", node.url],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["retrieving manifest", "pushing manifest", "success"], r.stdout
    assert "pushing b179c9523d0e  98.4 MB" in r.stderr  # not a tty: each bar prints its label once
    r = subprocess.run([*CLI, "models", "pull", name, "--api", node.url],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and "--insecure" in r.stderr and "Traceback" not in r.stderr

    print("=== pull on a fresh node with no model at all")
    fresh = no_default_node(tmp_path / "puller")
    try:
        assert tags(fresh) == []
        puller = ollama.Client(host=fresh.url)
        t0 = time.monotonic()
        events = [e.model_dump(exclude_none=True) for e in puller.pull(name, insecure=True, stream=True)]
        took = time.monotonic() - t0
        print(f"pulled 98 MB in {took:.2f}s ({98.4 / took:.0f} MB/s)")
        s = statuses(events)
        assert s[0] == "pulling manifest", s
        assert s[-3:] == ["verifying sha256 digest", "writing manifest", "success"], s
        check_progress(events, "pulling")

        print("=== byte-identical blobs and manifest")
        mine, theirs = store_files(fresh), store_files(node)
        assert mine and all(theirs[k] == v for k, v in mine.items())
        manifest = ("manifests", registry.host, "library", "smollm2", "135m")
        assert (fresh.data_dir / "models").joinpath(*manifest).read_bytes() == \
            (node.data_dir / "models").joinpath(*manifest).read_bytes()
        assert tmp_files(fresh) == []
        assert name in tags(fresh)

        print("=== it generates")
        out = puller.generate(model=name, prompt="Say hi", options={"num_predict": 4, "seed": 1})
        assert out.response.strip() and out.done

        print("=== a second pull downloads nothing")
        again = [e.model_dump(exclude_none=True) for e in puller.pull(name, insecure=True, stream=True)]
        assert all(e["completed"] == e["total"] for e in again if e.get("digest"))
        assert puller.pull(name, insecure=True, stream=False).status == "success"

        print("=== a model the registry does not have is a 404")
        with pytest.raises(ollama.ResponseError) as missing:
            list(puller.pull(f"{registry.host}/library/nope:1", insecure=True, stream=True))
        assert missing.value.status_code == 404 and "not found" in str(missing.value)
        status, body = post(fresh, "/api/pull", {"model": f"{registry.host}/library/nope:1", "insecure": True,
                                                 "stream": False})
        assert status == 404, body
    finally:
        fresh.stop()
        pusher.delete(name)


def post(node: NodeProc, path: str, obj: Any) -> tuple[int, Any]:
    req = urllib.request.Request(node.url + path, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            return r.status, [json.loads(line) for line in raw.splitlines() if line.strip()]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---- interrupted downloads resume ---------------------------------------------------------------


@dataclass
class ProxyState:
    cut_after: int = 0  # bytes of a blob GET sent before the connection is cut
    cuts: int = 0  # how many blob GETs to cut
    stall_after: int = 0  # bytes of a blob GET sent before it hangs (0: never)
    released: threading.Event = field(default_factory=threading.Event)
    ranges: list[str] = field(default_factory=list)
    blob_bytes: int = 0
    corrupt: str = ""  # a digest prefix: the next GET of that blob gets one byte flipped
    no_cache: list[str] = field(default_factory=list)  # Range of each blob GET sent with Cache-Control: no-cache


def cutting_proxy(upstream: str, state: ProxyState) -> Server:
    """Forwards to the registry; cuts, stalls or corrupts blob downloads as `state` says."""

    async def forward(request: web.Request) -> web.StreamResponse:
        session = request.app[SESSION]
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("range", "accept", "authorization", "content-type")}
        body = await request.read()
        blob = request.method == "GET" and "/blobs/sha256:" in request.path
        if blob:
            state.ranges.append(request.headers.get("Range", ""))
            if request.headers.get("Cache-Control") == "no-cache":
                state.no_cache.append(request.headers.get("Range", ""))
        flip = blob and bool(state.corrupt) and f"/blobs/{state.corrupt}" in request.path
        if flip:
            state.corrupt = ""
        async with session.request(request.method, f"http://{upstream}{request.path_qs}", headers=headers,
                                   data=body or None, allow_redirects=False) as up:
            keep = {k: v for k, v in up.headers.items()
                    if k.lower() not in ("transfer-encoding", "connection", "date", "server")}
            resp = web.StreamResponse(status=up.status, headers=keep)
            await resp.prepare(request)
            sent = 0
            cut = blob and state.cuts > 0
            if cut:
                state.cuts -= 1
            async for chunk in up.content.iter_chunked(1 << 16):
                if cut and sent >= state.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if blob and state.stall_after and sent >= state.stall_after:
                    while not state.released.is_set():
                        await asyncio.sleep(0.05)
                if flip:  # a bad copy, as a broken mirror or CDN node might serve
                    chunk, flip = bytes([chunk[0] ^ 0xFF]) + chunk[1:], False
                await resp.write(chunk)
                sent += len(chunk)
                if blob:
                    state.blob_bytes += len(chunk)
            await resp.write_eof()
            return resp

    async def session_ctx(app: web.Application) -> Any:
        app[SESSION] = ClientSession(auto_decompress=False)
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return Server(app)


def pushed(node: NodeProc, registry: RegistryProc, repo: str) -> str:
    name = f"{registry.host}/library/{repo}"
    client = ollama.Client(host=node.url)
    client.copy(MODEL, name)
    try:
        assert list(client.push(name, insecure=True, stream=True))[-1].status == "success"
    finally:
        client.delete(name)
    return repo


def test_pull_resumes_after_cut_connections_and_an_interrupted_client(
        node: NodeProc, registry: RegistryProc, tmp_path: Path) -> None:
    repo = pushed(node, registry, "resumable:1")
    state = ProxyState(cut_after=4 << 20, cuts=3)
    proxy = cutting_proxy(registry.host, state)
    fresh = no_default_node(tmp_path / "puller")
    name = f"{proxy.host}/library/{repo}"
    try:
        print("=== three blob downloads cut after 4 MiB: the pull retries from where each part stopped")
        events = [e.model_dump(exclude_none=True)
                  for e in ollama.Client(host=fresh.url).pull(name, insecure=True, stream=True)]
        assert statuses(events)[-1] == "success"
        starts = [int(r.removeprefix("bytes=").split("-")[0]) for r in state.ranges if r]
        assert any(s not in PART_STARTS for s in starts), state.ranges  # resumed mid-part
        assert state.blob_bytes < 98362432 + (2 << 20), state.blob_bytes  # nothing fetched twice
        gguf = next(k for k in store_files(fresh) if k.startswith(GGUF_PREFIX))
        assert hashlib.sha256(store_files(fresh)[gguf]).hexdigest() == gguf[7:]
        ollama.Client(host=fresh.url).delete(name)
    finally:
        fresh.stop()
        proxy.close()

    print("=== Ctrl-C of `models pull` while the download hangs: nothing visible, the partial stays")
    state = ProxyState(stall_after=STALL)
    proxy = cutting_proxy(registry.host, state)
    fresh = no_default_node(tmp_path / "puller2")
    name = f"{proxy.host}/library/{repo}"
    try:
        cli = subprocess.Popen([*CLI, "models", "pull", "--insecure", name, "--api", fresh.url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        saved = wait_for(lambda: partial_progress(fresh) >= 4 * STALL, 60)
        assert saved, (tmp_files(fresh), fresh.log()[-2000:])
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, err
        assert b"interrupted" in err and b"resume" in err and b"Traceback" not in err
        assert wait_for(lambda: tags(fresh) == [] and not store_files(fresh), 5)
        left = tmp_files(fresh)
        assert any(n.endswith(".partial") for n in left) and any(n.endswith(".json") for n in left), left

        print("=== the same pull again resumes from the saved parts")
        before = state.blob_bytes
        state.released.set()
        state.stall_after = 0
        state.ranges.clear()
        r = subprocess.run([*CLI, "models", "pull", "--insecure", name, "--api", fresh.url],
                           capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == "success"
        assert "pulling b179c9523d0e" in r.stderr  # the progress bar's label
        spans = [tuple(int(v) for v in x.removeprefix("bytes=").split("-")) for x in state.ranges if x]
        big = [a for a, b in spans if b - a > 1 << 20]  # the model layer's parts, not the config
        assert len(big) == 4 and not set(big) & PART_STARTS, state.ranges  # each resumed mid-part
        assert state.blob_bytes - before < 98362432 - 4 * STALL + (2 << 20), (before, state.blob_bytes)
        assert name in tags(fresh) and tmp_files(fresh) == []
        gguf = next(k for k in store_files(fresh) if k.startswith(GGUF_PREFIX))
        assert hashlib.sha256(store_files(fresh)[gguf]).hexdigest() == gguf[7:]
    finally:
        state.released.set()
        fresh.stop()
        proxy.close()


def test_pull_resumes_after_the_node_is_killed(node: NodeProc, registry: RegistryProc, tmp_path: Path) -> None:
    repo = pushed(node, registry, "survives-kill:1")
    state = ProxyState(stall_after=STALL)
    proxy = cutting_proxy(registry.host, state)
    fresh = no_default_node(tmp_path / "puller")
    name = f"{proxy.host}/library/{repo}"
    try:
        print("=== kill -9 the node while the layer downloads")
        def doomed_pull() -> None:
            with contextlib.suppress(ollama.ResponseError, httpx.HTTPError):  # the node dies under it
                list(ollama.Client(host=fresh.url).pull(name, insecure=True, stream=True))

        puller = threading.Thread(target=doomed_pull)
        puller.start()
        assert wait_for(lambda: partial_progress(fresh) >= 4 * STALL, 60), fresh.log()[-2000:]
        fresh.stop(signal.SIGKILL)
        puller.join(30)
        saved = partial_progress(fresh)

        print("=== restarted on the same data dir: nothing visible, the partial kept")
        fresh = start_node(tmp_path / "puller", "--config", str(tmp_path / "puller" / "config.yaml"),
                           data_dir=fresh.data_dir)
        assert tags(fresh) == [] and not store_files(fresh)
        assert partial_progress(fresh) == saved >= 4 * STALL

        print("=== the pull resumes from the saved parts")
        state.released.set()
        state.stall_after = 0
        state.ranges.clear()
        before = state.blob_bytes
        events = [e.model_dump(exclude_none=True)
                  for e in ollama.Client(host=fresh.url).pull(name, insecure=True, stream=True)]
        assert statuses(events)[-1] == "success"
        first = next(e for e in events if e.get("digest", "").startswith("sha256:b179"))
        assert first["completed"] == saved, first  # progress starts where the saved parts stopped
        spans = [tuple(int(v) for v in x.removeprefix("bytes=").split("-")) for x in state.ranges if x]
        assert not {a for a, b in spans if b - a > 1 << 20} & PART_STARTS, state.ranges
        assert state.blob_bytes - before < 98362432 - saved + (2 << 20)
        gguf = next(k for k in store_files(fresh) if k.startswith(GGUF_PREFIX))
        assert hashlib.sha256(store_files(fresh)[gguf]).hexdigest() == gguf[7:]
        assert name in tags(fresh) and tmp_files(fresh) == []
    finally:
        state.released.set()
        fresh.stop()
        proxy.close()


def test_two_pulls_of_one_model_download_it_once(node: NodeProc, registry: RegistryProc, tmp_path: Path) -> None:
    repo = pushed(node, registry, "wanted-twice:1")
    state = ProxyState(stall_after=STALL)
    proxy = cutting_proxy(registry.host, state)
    fresh = no_default_node(tmp_path / "puller")
    name = f"{proxy.host}/library/{repo}"
    results: list[list[Any]] = []

    def pull() -> None:
        results.append(list(ollama.Client(host=fresh.url).pull(name, insecure=True, stream=True)))

    try:
        first = threading.Thread(target=pull)
        first.start()
        assert wait_for(lambda: partial_progress(fresh) >= 4 * STALL, 60), fresh.log()[-2000:]
        second = threading.Thread(target=pull)
        second.start()
        time.sleep(1)
        big = model_parts(state.ranges)
        assert len(big) == 4, state.ranges  # the second pull waits; it does not fetch the layer again
        state.released.set()
        first.join(120)
        second.join(120)
        assert len(results) == 2 and all(r[-1].status == "success" for r in results)
        assert len(model_parts(state.ranges)) == 4, state.ranges
        gguf = next(k for k in store_files(fresh) if k.startswith(GGUF_PREFIX))
        assert hashlib.sha256(store_files(fresh)[gguf]).hexdigest() == gguf[7:]
        assert tmp_files(fresh) == []
    finally:
        state.released.set()
        fresh.stop()
        proxy.close()


def partial_progress(node: NodeProc) -> int:
    done = 0
    for state in (node.data_dir / "models" / "tmp").glob("pull-*.json"):
        try:
            done += sum(p[2] for p in json.loads(state.read_text())["parts"])
        except (ValueError, OSError, KeyError):
            pass
    return done


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


# ---- registries that misbehave ---------------------------------------------------------------------


def blob_ref(media: str, data: bytes, digest: str | None = None) -> dict[str, Any]:
    return {"mediaType": media, "digest": digest or "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data)}


@dataclass
class FakeRegistry:
    manifests: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    token: str | None = None
    token_requests: list[dict[str, str]] = field(default_factory=list)
    garbage: bool = False
    bad_once: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes its next GET serves instead
    blob_gets: list[tuple[str, str]] = field(default_factory=list)  # (digest, Cache-Control) of each GET

    def add(self, repo_tag: str, layer_bytes: bytes, served: bytes | None = None,
            served_once: bytes | None = None) -> None:
        config = json.dumps({"model_format": "gguf"}).encode()
        layer = blob_ref("application/vnd.ollama.image.model", layer_bytes)
        cfg = blob_ref("application/vnd.docker.container.image.v1+json", config)
        self.blobs[layer["digest"]] = served if served is not None else layer_bytes
        if served_once is not None:
            self.bad_once[layer["digest"]] = served_once
        self.blobs[cfg["digest"]] = config
        self.manifests[repo_tag] = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": cfg, "layers": [layer]}).encode()

    uploads: dict[str, bytearray] = field(default_factory=dict)

    def _challenge(self, request: web.Request, scope: str) -> web.Response:
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}, status=401,
            headers={"WWW-Authenticate": f'Bearer realm="http://{request.host}/token",service="fake"'
                                         + (f',scope="{scope}"' if scope else "")})

    def app(self) -> web.Application:
        """Serves pulls, and pushes like distribution does (POST, PATCH with
        Content-Range, PUT ?digest=, manifest PUT); with `token`, every call
        needs a bearer token whose scope covers it (push for writes)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            if self.garbage:
                return web.Response(text="<html>this is not a registry</html>", content_type="text/html")
            if request.path == "/token":
                self.token_requests.append(dict(request.query))
                push = request.query.get("scope", "").endswith("push")
                return web.json_response({"token": f"{self.token}{'-push' if push else ''}"})
            parts = request.path.split("/")
            repo = "/".join(parts[2:4]) if len(parts) > 4 else ""
            write = request.method in ("POST", "PUT", "PATCH")
            if self.token:
                allowed = {f"Bearer {self.token}-push"} | (set() if write else {f"Bearer {self.token}"})
                if request.headers.get("Authorization") not in allowed:
                    return self._challenge(request, repo and f"repository:{repo}:{'pull,push' if write else 'pull'}")
            if request.path == "/v2/":
                return web.json_response({})
            if len(parts) == 6 and parts[4] == "manifests":
                if request.method == "PUT":
                    body = await request.read()
                    refs = json.loads(body)
                    missing = [r["digest"] for r in [refs["config"], *refs["layers"]] if r["digest"] not in self.blobs]
                    if missing:
                        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "detail": missing}]}, status=400)
                    self.manifests[f"{parts[3]}:{parts[5]}"] = body
                    return web.Response(status=201)
                data = self.manifests.get(f"{parts[3]}:{parts[5]}")
                if data is None:
                    return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
                return web.Response(body=data, content_type="application/vnd.docker.distribution.manifest.v2+json")
            if len(parts) >= 6 and parts[4:6] == ["blobs", "uploads"]:
                return await upload(request, parts)
            if len(parts) == 6 and parts[4] == "blobs" and parts[5] in self.blobs:
                data = self.blobs[parts[5]]
                if request.method == "GET":
                    self.blob_gets.append((parts[5], request.headers.get("Cache-Control", "")))
                    data = self.bad_once.pop(parts[5], data)
                rng = request.headers.get("Range", "")
                if rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    chunk = data[int(a): int(b) + 1 if b else None]
                    return web.Response(body=chunk, status=206, headers={
                        "Content-Range": f"bytes {a}-{int(a) + len(chunk) - 1}/{len(data)}"})
                return web.Response(body=data)
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)

        async def upload(request: web.Request, parts: list[str]) -> web.Response:
            base = "/".join(parts[:6])
            if request.method == "POST":
                uid = f"u{len(self.uploads)}"
                self.uploads[uid] = bytearray()
                return web.Response(status=202, headers={"Location": f"{base}/{uid}?_state=x%3D%3D"})
            uid = parts[6]
            buf = self.uploads[uid]
            if request.query.get("_state") != "x==":  # the Location's query must come back intact
                return web.json_response({"errors": [{"code": "BLOB_UPLOAD_INVALID"}]}, status=400)
            if request.method == "PATCH":
                start = int(request.headers["Content-Range"].split("-")[0])
                if start != len(buf):
                    return web.json_response({"errors": [{"code": "RANGE_INVALID"}]}, status=416)
            buf.extend(await request.read())
            if request.method == "PATCH":
                return web.Response(status=202, headers={"Location": f"{base}/{uid}?_state=x%3D%3D",
                                                         "Range": f"0-{len(buf) - 1}"})
            digest = request.query["digest"]
            if digest != "sha256:" + hashlib.sha256(buf).hexdigest():
                return web.json_response({"errors": [{"code": "DIGEST_INVALID"}]}, status=400)
            self.blobs[digest] = bytes(buf)
            return web.Response(status=201)

        app = web.Application(client_max_size=256 << 20)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def test_a_registry_answering_garbage_is_a_clear_error(node: NodeProc) -> None:
    fake = FakeRegistry(garbage=True)
    server = Server(fake.app())
    try:
        with pytest.raises(ollama.ResponseError) as e:
            list(ollama.Client(host=node.url).pull(f"{server.host}/library/x:1", insecure=True, stream=True))
        assert e.value.status_code == 502
        assert "not a manifest" in str(e.value) and "bytes of text, not shown" in str(e.value)
        assert "this is not a registry" not in str(e.value)  # a remote body is never echoed
        assert f"{server.host}/library/x:1" not in tags(node)

        print("=== manifests that try to climb out of the store, or are not models")
        fake.garbage = False
        hostile = {
            "climb:1": {"schemaVersion": 2, "config": blob_ref("c", b"{}"),
                        "layers": [{"mediaType": "m", "digest": "sha256:../../../../etc/passwd", "size": 1}]},
            "negative:1": {"schemaVersion": 2, "layers": [blob_ref("m", b"x") | {"size": -5}]},
            "index:1": {"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "0" * 64}]},
            "v1:1": {"schemaVersion": 1, "fsLayers": []},
        }
        for tag, manifest in hostile.items():
            fake.manifests[tag] = json.dumps(manifest).encode()
        for tag, expected in (("climb:1", "invalid digest"), ("negative:1", "invalid size"),
                              ("index:1", "manifest list"), ("v1:1", "schemaVersion 1")):
            status, body = post(node, "/api/pull", {"model": f"{server.host}/library/{tag}", "insecure": True})
            assert status == 502 and expected in body["error"], (tag, body)
        assert not [t for t in tags(node) if server.host in t]
        assert not (node.data_dir / "models" / "manifests" / server.host).exists()
    finally:
        server.close()


def test_a_layer_whose_bytes_do_not_match_its_digest_is_refused(node: NodeProc, tmp_path: Path) -> None:
    good = b"GGUF" + bytes(range(256)) * 4000
    claimed = b"GGUF" + bytes((i + 1) % 256 for i in range(256)) * 4000
    bad = b"GGUF" + bytes(reversed(range(256))) * 4000  # same size as the claimed bytes, other content
    fake = FakeRegistry(token="t0k3n")
    fake.add("good:1", good)
    fake.add("bad:1", claimed, served=bad)
    server = Server(fake.app())
    fresh = no_default_node(tmp_path / "puller")
    client = ollama.Client(host=fresh.url)
    try:
        print("=== a registry behind a bearer token realm: the token is fetched for its scope")
        events = [e.model_dump(exclude_none=True)
                  for e in client.pull(f"{server.host}/library/good:1", insecure=True, stream=True)]
        assert statuses(events)[-1] == "success"
        assert {"service": "fake", "scope": "repository:library/good:pull"} in fake.token_requests
        assert store_files(fresh)["sha256-" + hashlib.sha256(good).hexdigest()] == good

        print("=== the registry's model changes: a new pull replaces it and removes the old layer")
        newer = good[::-1]
        fake.add("good:1", newer)
        events = [e.model_dump(exclude_none=True)
                  for e in client.pull(f"{server.host}/library/good:1", insecure=True, stream=True)]
        assert statuses(events)[-3:] == ["writing manifest", "removing unused layers", "success"], events
        blobs = store_files(fresh)
        assert blobs["sha256-" + hashlib.sha256(newer).hexdigest()] == newer
        assert "sha256-" + hashlib.sha256(good).hexdigest() not in blobs
        again = [e.model_dump(exclude_none=True)
                 for e in client.pull(f"{server.host}/library/good:1", insecure=True, stream=True)]
        assert "removing unused layers" not in statuses(again)  # nothing replaced, nothing removed

        print("=== registry tags are case-sensitive; the store's names are not")
        fake.add("good:Q4_K_M", good)
        assert list(client.pull(f"{server.host}/library/good:Q4_K_M", insecure=True, stream=True))[-1].status \
            == "success"
        assert f"{server.host}/library/good:q4_k_m" in tags(fresh)

        print("=== wrong bytes once (a bad mirror): discarded, fetched again past the caches, pulled")
        fake.add("flaky:1", good[::3], served_once=claimed[: len(good[::3])])
        digest = "sha256:" + hashlib.sha256(good[::3]).hexdigest()
        fake.blob_gets.clear()
        events = [e.model_dump(exclude_none=True)
                  for e in client.pull(f"{server.host}/library/flaky:1", insecure=True, stream=True)]
        s = statuses(events)
        assert s[-3:] == ["verifying sha256 digest", "writing manifest", "success"], s
        assert f"digest mismatch for layer {digest[7:19]}; pulling it again" in s, s
        assert s.count("verifying sha256 digest") == 2, s
        assert [c for d, c in fake.blob_gets if d == digest] == ["", "no-cache"], fake.blob_gets
        assert store_files(fresh)["sha256-" + digest[7:]] == good[::3]
        assert f"{server.host}/library/flaky:1" in tags(fresh) and tmp_files(fresh) == []
        assert "fetching it once more" in fresh.log()

        print("=== wrong bytes for a layer every time: refused, nothing visible, nothing left behind")
        bad_digest = "sha256:" + hashlib.sha256(claimed).hexdigest()
        fake.blob_gets.clear()
        with pytest.raises(ollama.ResponseError) as e:
            list(client.pull(f"{server.host}/library/bad:1", insecure=True, stream=True))
        assert "digest mismatch" in str(e.value) and "fetched a second time too" in str(e.value), e.value
        assert [c for d, c in fake.blob_gets if d == bad_digest] == ["", "no-cache"], fake.blob_gets
        assert f"{server.host}/library/bad:1" not in tags(fresh)
        assert "sha256-" + hashlib.sha256(bad).hexdigest() not in store_files(fresh)
        assert tmp_files(fresh) == []
        status, body = post(fresh, "/api/pull", {"model": f"{server.host}/library/bad:1", "insecure": True,
                                                 "stream": False})
        assert status == 502 and "digest mismatch" in body["error"]
    finally:
        fresh.stop()
        server.close()


def test_a_layer_corrupted_on_the_way_is_fetched_again_and_the_model_works(
        node: NodeProc, registry: RegistryProc, tmp_path: Path) -> None:
    """The real registry behind a proxy that flips one byte of the model layer
    once, as a broken mirror or CDN node would: the pull finds the mismatch,
    fetches the layer again (asking caches to revalidate), and the model runs."""
    repo = pushed(node, registry, "corrupted-once:1")
    state = ProxyState(corrupt="sha256:" + GGUF_PREFIX[7:])
    proxy = cutting_proxy(registry.host, state)
    fresh = no_default_node(tmp_path / "puller")
    name = f"{proxy.host}/library/{repo}"
    client = ollama.Client(host=fresh.url)
    try:
        events = [e.model_dump(exclude_none=True) for e in client.pull(name, insecure=True, stream=True)]
        s = statuses(events)
        assert s[-3:] == ["verifying sha256 digest", "writing manifest", "success"], s
        assert "digest mismatch for layer b179c9523d0e; pulling it again" in s, s
        assert not state.corrupt  # the byte was flipped
        big = model_parts(state.ranges)  # the model layer's parts
        assert len(big) == 8 and sorted(state.no_cache) == sorted(big[4:]), (state.ranges, state.no_cache)
        assert 2 * 98362432 <= state.blob_bytes < 2 * 98362432 + (1 << 20), state.blob_bytes
        gguf = next(k for k in store_files(fresh) if k.startswith(GGUF_PREFIX))
        assert hashlib.sha256(store_files(fresh)[gguf]).hexdigest() == gguf[7:]
        assert name in tags(fresh) and tmp_files(fresh) == []
        out = client.generate(model=name, prompt="Say hi", options={"num_predict": 4, "seed": 1})
        assert (out.response or "").strip() and out.done
    finally:
        fresh.stop()
        proxy.close()


# ---- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real, small file system: a 160 MB tmpfs (root, as CI and these machines are)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_disk_is_a_clear_error_and_frees_the_space(
        node: NodeProc, registry: RegistryProc, small_disk: Path, tmp_path: Path) -> None:
    repo = pushed(node, registry, "bigger-than-the-disk:1")
    cfg = tmp_path / "config.yaml"
    cfg.write_text('models:\n  default: ""\n')
    state = ProxyState(stall_after=STALL)
    proxy = cutting_proxy(registry.host, state)
    fresh = start_node(tmp_path, "--config", str(cfg), data_dir=small_disk / "data")
    client = ollama.Client(host=fresh.url)
    try:
        print("=== the disk fills up while the layer downloads: a clear error, the partial removed")
        events: list[Any] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                events.extend(client.pull(f"{proxy.host}/library/{repo}", insecure=True, stream=True))
            except Exception as e:  # whatever it is, the asserts below show it
                failure.append(e)

        puller = threading.Thread(target=run)
        puller.start()
        assert wait_for(lambda: partial_progress(fresh) >= 4 * STALL, 60), fresh.log()[-2000:]
        filler = small_disk / "filler"
        with open(filler, "wb") as f:  # take every free byte
            try:
                while True:
                    f.write(bytes(1 << 20))
            except OSError:
                pass
        state.released.set()
        puller.join(60)
        assert failure and isinstance(failure[0], ollama.ResponseError), (failure, events)
        assert "no space left" in str(failure[0]), failure
        print(f"    {failure[0]}")
        assert tags(fresh) == [] and not store_files(fresh)
        assert wait_for(lambda: tmp_files(fresh) == [], 5), tmp_files(fresh)

        print("=== with the filler still there, the next pull is refused before it starts: 507")
        status, body = post(fresh, "/api/pull", {"model": f"{proxy.host}/library/{repo}", "insecure": True})
        assert status == 507 and "no space left" in body["error"] and "MB are free" in body["error"], body
        filler.unlink()
        assert shutil.disk_usage(small_disk).free > 120_000_000  # the partial's space came back too
    finally:
        state.released.set()
        fresh.stop()
        proxy.close()


def test_push_to_a_registry_behind_a_token_realm(node: NodeProc) -> None:
    fake = FakeRegistry(token="t0k3n")
    server = Server(fake.app())
    name = f"{server.host}/library/tokened:V1"
    client = ollama.Client(host=node.url)
    client.copy(MODEL, name)
    try:
        events = [e.model_dump(exclude_none=True) for e in client.push(name, insecure=True, stream=True)]
        assert statuses(events)[-1] == "success"
        check_progress(events, "pushing")
        assert {"service": "fake", "scope": "repository:library/tokened:pull,push"} in fake.token_requests
        manifest = (node.data_dir / "models" / "manifests" / server.host / "library" / "tokened" / "v1").read_bytes()
        assert fake.manifests["tokened:V1"] == manifest  # byte for byte, under the tag as written
        for ref in [json.loads(manifest)["config"], *json.loads(manifest)["layers"]]:
            local = node.data_dir / "models" / "blobs" / ref["digest"].replace(":", "-")
            assert fake.blobs[ref["digest"]] == local.read_bytes()
    finally:
        client.delete(name)
        server.close()


def test_a_registry_with_a_password_uses_netrc(node: NodeProc, tmp_path: Path) -> None:
    """docker-registry with htpasswd (HTTP Basic): refused clearly without
    credentials; with them in the node user's ~/.netrc, push and pull work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # Python 3.11's libxcrypt binding makes the bcrypt hash htpasswd needs
    (tmp_path / "htpasswd").write_text(f"alice:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    port = free_port()
    (tmp_path / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'storage'}\n"
        f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp_path / 'htpasswd'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: test-only\n")
    exe = shutil.which("docker-registry") or pytest.fail("docker-registry is missing: run scripts/apt-deps.sh")
    reg = subprocess.Popen([exe, "serve", str(tmp_path / "config.yml")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    home = tmp_path / "home"
    home.mkdir()
    holder = start_node(home, env={"HOME": str(home)})
    name = f"127.0.0.1:{port}/library/guarded:1"
    try:
        client = ollama.Client(host=holder.url)
        client.copy(MODEL, name)
        print("=== no credentials: a clear 502 that says where they go")
        assert wait_for(lambda: post(holder, "/api/push", {"model": name, "insecure": True})[0] == 502, 10)
        status, body = post(holder, "/api/push", {"model": name, "insecure": True})
        assert "username and password" in body["error"] and "machine 127.0.0.1 login" in body["error"], body

        print("=== credentials in ~/.netrc: push, then pull it back under the same name")
        netrc = home / ".netrc"
        netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
        netrc.chmod(0o600)
        assert list(client.push(name, insecure=True, stream=True))[-1].status == "success"
        client.delete(name)
        assert list(client.pull(name, insecure=True, stream=True))[-1].status == "success"
        assert name in tags(holder)

        print("=== a wrong password is refused, not retried forever")
        netrc.write_text("machine 127.0.0.1 login alice password wrong\n")
        status, body = post(holder, "/api/pull", {"model": name, "insecure": True})
        assert status == 502 and "username and password" in body["error"], body
    finally:
        holder.stop()
        reg.terminate()
        reg.wait(10)
