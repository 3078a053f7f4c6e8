"""A running node: data dir, store, engine, dispatcher, API and web servers,
systemd glue, and (when available) the cluster core. `ollama-distributed start`
runs `Node.run()`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from . import __version__, _core, config, logs
from .cluster import advert
from .config import Config
from .dispatch import Dispatcher
from .engines import parallel
from .engines.base import Engine
from .errors import BadRequestError, ConfigError, ConflictError, NotFoundError
from .metrics import Metrics
from .models import catalog
from .models.fsutil import atomic_write
from .models.store import Store
from .security import redact
from .security.keys import KeyRing
from .security.origins import is_loopback_host
from .supervise import Supervisor
from .systemd import Notifier

logger = logging.getLogger(__name__)


def make_engine(cfg: Config, dispatcher: Callable[[], Dispatcher]) -> Engine:
    kind = cfg.engine.kind
    if kind == "llamacpp":
        from .engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            cfg.engine,
            evict_candidate=lambda loaded, n: dispatcher().scheduler.evict_candidate(loaded, n),
            is_idle=lambda m: dispatcher().is_idle(m),
        )
    if kind == "mock":
        from .engines.mock import MockEngine

        return MockEngine(cfg.engine)
    from .engines.upstream import OllamaUpstreamEngine, OpenAIUpstreamEngine

    if kind == "openai":
        return OpenAIUpstreamEngine(cfg.engine)
    return OllamaUpstreamEngine(cfg.engine)


def prepare_data_dir(path: Path) -> None:
    """Create the data dir, or say clearly why it cannot be used."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the data dir {path}: {e.strerror}; "
                          "set node.data_dir (or --data-dir) to a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"the data dir {path} is not writable by this user; "
                          "fix its permissions or set node.data_dir (or --data-dir)")


def load_identity(data_dir: Path, configured: str) -> str:
    """The node id: configured, else kept in the data dir, else made once."""
    if configured:
        return configured
    path = data_dir / "node_id"
    with contextlib.suppress(FileNotFoundError):
        node_id = path.read_text().strip()
        if node_id:
            return node_id
    node_id = f"node-{secrets.token_hex(4)}"
    atomic_write(path, (node_id + "\n").encode())
    return node_id


class Node:
    def __init__(self, cfg: Config, overrides: dict[str, dict[str, Any]] | None = None,
                 config_path: str | None = None) -> None:
        self.cfg = cfg
        self._overrides = overrides or {}
        self._config_path = config_path
        self.data_dir = cfg.data_dir()
        prepare_data_dir(self.data_dir)
        self.node_id = load_identity(self.data_dir, cfg.node.id)
        self.name = cfg.node.name or socket.gethostname()
        self.store = Store(self.data_dir / "models")
        self.metrics = Metrics()
        self.metrics.bind_cluster(
            lambda: self.cluster.status() if getattr(self, "cluster", None) is not None else None)
        self.metrics.bind_replication(
            lambda: self.replicator.status() if getattr(self, "replicator", None) is not None else None)
        # engine.num_parallel 0: chosen from the models' KV cache and the memory
        # available; the running config holds the number chosen
        self.parallel_auto = cfg.engine.num_parallel == 0
        cfg.engine.num_parallel = parallel.resolve(cfg.engine, self.store)
        self.engine: Engine = make_engine(cfg, lambda: self.dispatcher)
        if cfg.engine.kind == "llamacpp":  # a model too large for this node splits across peers
            from .engines.split import SplittingEngine, candidates

            self.engine = SplittingEngine(
                self.engine, cfg.engine, self.store.root, self.node_id,
                peers=lambda m: candidates(self.cluster.nodes(), self._checked_advert, self.node_id, m)
                if self.cluster is not None else [],
                open_tunnel=lambda peer: self.cluster.open_rpc_tunnel(peer),
                close_tunnel=lambda port: self.cluster.close_rpc_tunnel(port))
        self.dispatcher = Dispatcher(cfg, self.node_id, self.store, self.engine, self.metrics)
        self.notifier = Notifier()
        self.supervisor = Supervisor()
        # ggml RPC server offering this machine's CPU to split models (engines/rpc.py)
        self.rpc: Any = None
        if cfg.engine.rpc_server:
            from .engines.rpc import RpcServer

            self.rpc = RpcServer(cfg.engine)
        self._adverts: dict[str, tuple[float, dict[str, Any] | None]] = {}  # peer -> (advert_at, checked)
        self.keys = KeyRing(self.data_dir)  # API keys: a local file until the cluster core runs
        self.http_ports: list[int] = []  # the API and web ports as bound: their origins are this node's
        self.guards: list[Any] = []  # api.guard.Guard of each HTTP port, told of a reload
        self.tenancies: list[Any] = []  # api.tenancy.Tenancy of the API port, told of a reload
        for secret in [*cfg.api.auth_tokens, cfg.p2p.token]:
            redact.add_secret(secret)
        self.cluster: Any = None  # ClusterService once the cluster core runs
        self.replicator: Any = None  # cluster.replication.Replicator with the cluster core
        self.p2p_reason = ""
        self._peers: set[str] = set()
        self.started_at = time.time()
        self.ready = False
        self.websocket_connections = 0
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()  # a second SIGTERM/SIGINT: stop without waiting for the drain
        self._drain_task: asyncio.Task[None] | None = None
        self._candidacy_held = False  # a draining leader that handed over does not stand for election
        self.api_url = ""
        self.web_url = ""
        psutil.cpu_percent(interval=None)  # prime: the first reading is meaningless

    # ---- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        self.notifier.status("registering models")
        await asyncio.to_thread(self.store.ensure)
        if self.engine.uses_store and self.cfg.models.default:  # "" means no bundled model
            await asyncio.to_thread(catalog.register_default, self.store, self.cfg.models.default)
        if self.rpc is not None:
            self.rpc.check()  # a wheel without libggml-rpc is a config error, said at start
        await self.engine.start()
        reaper = getattr(self.engine, "reaper", None)
        if reaper is not None:
            self.supervisor.adopt("keep-alive-reaper", reaper)
        await self.dispatcher.refresh_upstream()
        self._refresh_local_node()
        from .api.app import create_app

        api = create_app(self)
        self.api_url = await self._serve(api, self.cfg.api.host, self.cfg.api.port)
        if self.cfg.web.enabled:
            from .web.app import create_web_app

            self.web_url = await self._serve(create_web_app(self), self.cfg.web.host, self.cfg.web.port)
        await self._serve_admin()
        await self._start_cluster()
        if self.cluster is not None:
            await self.keys.attach(self.cluster)
        self.supervisor.watch("keys", self.keys.run())
        if self.rpc is not None:
            self.supervisor.watch("rpc-server", self.rpc.run())
        if not is_loopback_host(self.cfg.api.host) and not (self.cfg.api.auth_tokens or self.keys.active):
            logger.warning("the API listens on %s without API keys: anyone who can reach it can use it; "
                           "create an admin key (`ollama-distributed keys create admin --role admin`) "
                           "or bind to 127.0.0.1", self.cfg.api.host)
        if self.web_url and not is_loopback_host(self.cfg.web.host) and not (
                self.cfg.api.auth_tokens or self.keys.active):
            logger.warning("the dashboard listens on %s without API keys: anyone who can reach it sees the "
                           "cluster's state; create a key (`ollama-distributed keys create NAME`) or bind "
                           "web.host to 127.0.0.1", self.cfg.web.host)
        self.ready = True
        self.notifier.ready(f"serving on {self.api_url}")
        self.notifier.start_watchdog(healthy=lambda: self.supervisor.healthy)
        interval = self.cfg.scheduler.advert_interval_ms / 1000
        self.supervisor.loop("advert", self._advertise_once, lambda: interval)

    async def _start_cluster(self) -> None:
        """Bind the QUIC peer port: create the cluster, join one, or rejoin."""
        if not self.cfg.p2p.enabled:
            self.p2p_reason = "p2p.enabled is false"
            return
        from .cluster.service import ClusterService

        p2p = self.cfg.p2p
        api_host = self.cfg.api.host if self.cfg.api.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
        svc = ClusterService(node_id=self.node_id, data_dir=self.data_dir, host=p2p.host, port=p2p.port,
                             join=list(p2p.join), token=p2p.token or None,
                             api_address=f"http://{api_host}:{self.api_url.rsplit(':', 1)[1]}",
                             failure_timeout=p2p.failure_timeout_ms / 1000, max_voters=p2p.max_voters)
        self.notifier.status("joining the cluster" if p2p.join else "starting the cluster core")
        try:
            await svc.start()
        except PermissionError as e:
            raise ConfigError(f"the cluster refused to let this node join: {e}; get a fresh token with "
                              "`ollama-distributed cluster token` on a member and pass it with --token") from None
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"cannot start the P2P listener on {p2p.host}:{p2p.port}/udp: {e}; "
                              "free the port or set p2p.port (--p2p-port)") from None
        svc.set_inbound_handler(self.handle_inbound)
        svc.configure_blobs(self.store.root, self.cfg.models.replication_bandwidth_mbps)
        self.cluster = svc
        if self.rpc is not None:
            # peers' RPC tunnels reach the server while it serves (rust/tunnel/)
            self.rpc.on_port = svc.set_rpc_port
            if self.rpc.ready:
                svc.set_rpc_port(self.rpc.port)
        if self.engine.uses_store:
            from .cluster.replication import Replicator

            self.replicator = Replicator(self.store, svc, self.node_id, self.cfg.models.replicas,
                                         on_change=self.models_changed, keep=self.cfg.models.default,
                                         in_use=lambda m: not self.dispatcher.is_idle(m),
                                         on_removed=self.engine.unload)
            self.supervisor.watch("replication", self.replicator.run())
        if svc.inbound_task is not None:
            self.supervisor.adopt("cluster-inbound", svc.inbound_task)
        self.dispatcher.remote = svc

    async def _serve_admin(self) -> None:
        """The local admin socket (api/admin.py) in the data dir."""
        from .api import admin

        path = self.data_dir / admin.SOCKET
        try:
            sock = admin.bind(path)
        except OSError as e:
            logger.warning("no admin socket at %s: %s; `keys` and `cluster token` cannot reach this node",
                           path, e.strerror or e)
            return
        if sock is None:
            return
        runner = web.AppRunner(admin.create_admin_app(self), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runners.append(runner)
        self.admin_socket = path

    def keys_storage(self) -> str:
        return "cluster" if self.keys.cluster is not None else f"local file {self.keys.file.path}"

    async def _serve(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; another process may hold "
                              "the port (see `ss -ltnp`), or choose another port") from None
        self._runners.append(runner)
        bound = int(runner.addresses[-1][1]) if runner.addresses else port
        self.http_ports.append(bound)
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "") else host
        return f"http://{shown}:{bound}"

    async def stop(self) -> None:
        self.ready = False
        self.notifier.stopping()
        await self.supervisor.stop()
        await self.notifier.stop_watchdog()
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.engine.stop()
        admin_socket = getattr(self, "admin_socket", None)
        if admin_socket is not None:
            with contextlib.suppress(OSError):
                admin_socket.unlink()

    def request_stop(self) -> None:
        if self._stop.is_set():
            logger.warning("asked again to stop: not waiting for the drain")
            self._hurry.set()
        self._stop.set()

    # ---- drain -------------------------------------------------------------------

    async def handle_inbound(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """What a peer sends over QUIC: an inference request for the
        dispatcher, or a drain/undrain of this node (`cluster drain NODE` at
        any member travels here over the cluster's mTLS link)."""
        if request.get("kind") == "control":
            if request.get("action") == "campaign":
                yield await self.campaign()
                return
            yield self.control(str(request.get("action", "")))
            return
        async for chunk in self.dispatcher.handle_inbound(request):
            yield chunk

    def control(self, action: str) -> dict[str, Any]:
        if action == "drain":
            changed = self.start_drain()
        elif action == "undrain":
            changed = self.undrain()
        else:
            raise BadRequestError(f"unknown control action {action!r}: expected drain or undrain")
        return {"done": True, "node": self.node_id, "draining": self.draining, "changed": changed,
                "in_flight": self.dispatcher.active}

    async def control_node(self, node_id: str, action: str) -> dict[str, Any]:
        """Drain or undrain `node_id` (this node, or a peer through the cluster)."""
        if node_id in ("", self.node_id, self.name):
            return self.control(action)
        known = {n["id"]: n for n in self.cluster_nodes()}
        by_name = {n["name"]: i for i, n in known.items()}
        target = node_id if node_id in known else by_name.get(node_id)
        if target is None or self.cluster is None:
            raise NotFoundError(f"no node '{node_id}' in this cluster (see `ollama-distributed nodes`)")
        if known[target]["status"] != "active":
            raise ConflictError(f"node '{node_id}' is down")
        out: dict[str, Any] = {}
        async for chunk in self.cluster.forward(target, {"kind": "control", "action": action}):
            out = chunk
        return out

    @property
    def draining(self) -> bool:
        return self.dispatcher.draining

    def start_drain(self) -> bool:
        """`cluster drain`: drain in the background, the process kept. False
        when already draining."""
        if self.draining:
            return False
        self.dispatcher.draining = True  # at once: readiness and routing follow before the task runs
        self._drain_task = asyncio.create_task(self.drain(), name="drain")
        return True

    def undrain(self) -> bool:
        """Take requests again. False when this node was not draining."""
        if not self.draining:
            return False
        if self._stop.is_set():
            raise ConflictError(f"node {self.node_id} is stopping: its drain cannot be undone")
        if self._drain_task is not None:
            self._drain_task.cancel()
            self._drain_task = None
        self.dispatcher.draining = False
        if self._candidacy_held and self.cluster is not None:
            self.cluster.hold_candidacy(False)
            self._candidacy_held = False
        self._refresh_local_node()
        logger.info("drain ended: taking requests again")
        self.notifier.status(f"serving on {self.api_url}")
        return True

    async def campaign(self) -> dict[str, Any]:
        """The draining leader asks this node to lead: stand for election now."""
        if self.cluster is None:
            raise BadRequestError("this node runs without the cluster core: there is no election")
        if self.draining:
            raise ConflictError(f"node {self.node_id} is draining: it does not take over the lead")
        logger.info("the leader is draining and hands over: standing for election")
        await self.cluster.campaign()
        return {"done": True, "node": self.node_id, "campaign": True}

    async def hand_over_leadership(self, timeout: float = 3.0) -> str | None:
        """A draining leader hands the lead to a caught-up peer first, so the
        cluster has a leader before this node stops rather than an election
        timeout after (openraft 0.9 has no leader transfer: see
        rust/consensus/handover.rs). The new leader's id, or None when this
        node is not the leader or no peer took over (the others then elect one
        when it stops, as before)."""
        c = self.cluster
        if c is None or c.status().get("role") != "leader":
            return None
        draining = {n["id"] for n in self.cluster_nodes() if n.get("draining")}
        loop = asyncio.get_running_loop()
        for name in [s for s in c.successors() if s not in draining]:
            c.hold_candidacy(True)  # once it steps down, it never takes the lead back while draining
            self._candidacy_held = True
            t0 = loop.time()
            try:
                async with asyncio.timeout(timeout):
                    async for _ in c.forward(name, {"kind": "control", "action": "campaign"}):
                        pass
            except Exception as e:  # an older node, or one going down: try the next
                logger.info("could not hand the lead to %s: %s", name, e)
                continue
            while loop.time() - t0 < timeout:
                status = c.status()
                if status.get("role") != "leader" and status.get("leader_id"):
                    logger.info("draining: leadership handed to %s in %.0f ms (term %s)",
                                status["leader_id"], (loop.time() - t0) * 1000, status.get("term"))
                    return str(status["leader_id"])
                await asyncio.sleep(0.02)
            logger.info("%s stood for election but this node still leads after %gs", name, timeout)
        if self._candidacy_held:
            c.hold_candidacy(False)  # nobody took over: stay a candidate so the cluster keeps a leader
            self._candidacy_held = False
        logger.warning("draining leader: no peer took over the lead; the others elect one when this node stops")
        return None

    async def drain(self, stopping: bool = False) -> None:
        """Stop taking requests and let those under way finish: readiness 503
        at once, the advert says draining (peers route elsewhere within an
        advert interval), queued requests go back to their entry nodes to be
        retried on a peer, running ones get node.drain_timeout_s, then the ones
        still generating here are cut and resume elsewhere (their entry nodes
        migrate them). A stream this node is the entry of cannot move (the
        client is connected here): it gets the whole timeout."""
        d = self.dispatcher
        d.draining = True
        self._refresh_local_node()  # the advert says so now, not at the next interval
        loop = asyncio.get_running_loop()
        timeout = self.cfg.node.drain_timeout_s
        deadline = loop.time() + timeout
        shed = d.shed_queue()
        logger.info("draining: %d request(s) under way, %d queued one(s) sent elsewhere; waiting up to %gs "
                    "(node.drain_timeout_s)", d.active, shed, timeout)
        await self.hand_over_leadership()
        verb = "stopping" if stopping else "draining"
        while d.active > 0 and loop.time() < deadline and not self._hurry.is_set():
            self.notifier.status(f"{verb}: waiting for {d.active} request(s) under way, "
                                 f"{max(0, deadline - loop.time()):.0f}s left")
            d.shed_queue()  # any that queued since (a peer had not seen the advert yet)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), 0.1)
        if d.active > 0:
            cut = d.cut_local()
            logger.warning("drain timeout: %d request(s) still under way; %d generation(s) here move to "
                           "other nodes", d.active, cut)
            # the cut ones end at their next chunk; give their errors a moment to reach their entries
            end = loop.time() + 2.0
            while d._cuts and loop.time() < end:
                await asyncio.sleep(0.05)
        else:
            logger.info("drained: nothing under way")
        self.notifier.status(f"{verb}: drained" if d.active == 0 else f"{verb}: {d.active} request(s) left")

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply the keys that can change live."""
        self.notifier.reloading()
        try:
            new = config.load(self._config_path, self._overrides)
        except ConfigError as e:
            logger.error("reload failed, keeping the running config: %s", e)
            self.notifier.ready("reload failed; running with the previous config")
            return
        logs.set_level(new.logging.level)
        self.cfg.logging = new.logging
        self.cfg.api.auth_tokens = new.api.auth_tokens
        for secret in new.api.auth_tokens:
            redact.add_secret(secret)
        for key in ("cors_origins", "allowed_hosts", "allow_request_templates", "max_template_bytes"):
            setattr(self.cfg.api, key, getattr(new.api, key))
        self.cfg.web.max_clients = new.web.max_clients
        self.cfg.api.trusted_proxies = new.api.trusted_proxies
        for guard in self.guards:
            guard.reconfigure()
        for t in self.tenancies:
            t.reconfigure()
        self.cfg.scheduler = new.scheduler
        self.parallel_auto = new.engine.num_parallel == 0
        self.cfg.engine.num_parallel = parallel.resolve(new.engine, self.store)
        self.cfg.engine.max_queue = new.engine.max_queue
        self.cfg.engine.max_loaded_models = new.engine.max_loaded_models
        self.cfg.engine.keep_alive = new.engine.keep_alive
        self.dispatcher.reconfigure(self.cfg)
        logger.info("configuration reloaded from %s", new.source)
        self.notifier.ready(f"serving on {self.api_url} (config reloaded)")

    async def run(self, on_started: Callable[[Node], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            if on_started:
                on_started(self)
            await self._stop.wait()
            logger.info("shutting down")
            self.ready = False
            self.notifier.stopping()
            if self._drain_task is not None:
                self._drain_task.cancel()
            await self.drain(stopping=True)
        finally:
            await self.stop()

    # ---- state -------------------------------------------------------------------

    async def _advertise_once(self) -> None:
        await self.dispatcher.refresh_upstream()
        self._refresh_local_node()
        self._publish_status()

    def _publish_status(self) -> None:
        """systemd's STATUS= follows the state as it changes (`systemctl status` shows it)."""
        c = self.cluster_status()
        loaded = ", ".join(m.name for m in self.engine.loaded()) or "none"
        line = (f"serving on {self.api_url}: {c['role']}, {c.get('peers_connected', 0)} peer(s); "
                f"loaded: {loaded}; {self.dispatcher.scheduler.total_in_flight()} in flight, "
                f"{self.dispatcher.requests_total} served")
        if line != getattr(self, "_last_status", ""):
            self._last_status = line
            self.notifier.status(line)

    def advert(self) -> dict[str, Any]:
        d = self.dispatcher
        loaded = [m.name for m in self.engine.loaded()]
        return {
            "id": self.node_id, "name": self.name, "version": __version__,
            "api_address": self.api_url, "resources": self.resources(),
            "models": d.local_models(), "loaded": loaded,
            "in_flight": d.scheduler.total_in_flight(), "queue_depth": d.scheduler.queue_depth(),
            "max_queue": self.cfg.engine.max_queue, "engine": self.engine.kind,
            "labels": dict(self.cfg.node.labels),
            "draining": d.draining,
            # whether a model can load here without evicting one a request is running on
            "max_loaded_models": self.cfg.engine.max_loaded_models,
            "busy": [m for m in loaded if not d.is_idle(m)],
            # what the engine keeps warm, for every entry node's prefix-aware routing
            "prefix_hashes": self.prefix_hashes(),
            **(self.replicator.advert_fields() if self.replicator is not None else {}),
            **self.keys.advert_fields(),
            # the memory this node offers to split models over its RPC server
            **(self.rpc.advert_fields() if self.rpc is not None else {"rpc_ready": False, "rpc_memory_mib": 0}),
        }

    def prefix_hashes(self) -> list[int] | None:
        """The chain hashes (rust/scheduler/prefix.rs) of the prompts the
        engine keeps warm, without repeats, at most advert.MAX_PREFIX_HASHES.
        None when the engine cannot know (an upstream server's cache is out of
        sight): the advert then leaves the field out and routers keep their
        guesses about this node."""
        warm = getattr(self.engine, "warm_prompts", None)
        if not self.engine.uses_store or warm is None:
            return None
        seen: dict[int, None] = {}
        for model, prompts in self.dispatcher.aliases.expand(warm()).items():
            for p in prompts:
                for h in _core.prefix_hashes(model, p):
                    seen[h] = None
                    if len(seen) >= advert.MAX_PREFIX_HASHES:
                        return list(seen)
        return list(seen)

    def _refresh_local_node(self) -> None:
        a = self.advert()
        self.dispatcher.advertised_models = list(a["models"])
        self.dispatcher.update_local()
        # this node's own warm prefixes replace its router's guess about itself
        # as a peer's advert does
        if a["prefix_hashes"] is not None:
            self._set_warm(self.node_id, a["prefix_hashes"], time.time())
        if self.cluster is not None:
            self.cluster.publish_advert(a)
            self._sync_peers()

    def _checked_advert(self, n: dict[str, Any]) -> dict[str, Any] | None:
        """A peer's advert with every field checked (cluster/advert.py), checked
        once per advert; None (and a counted rejection) when a field is wrong."""
        at = float(n.get("advert_at") or 0)
        cached = self._adverts.get(n["id"])
        if cached is not None and cached[0] == at:
            return cached[1]
        try:
            adv: dict[str, Any] | None = advert.check(n.get("advert"))
        except advert.BadAdvert as e:
            self.metrics.peer_adverts_rejected.labels(e.field).inc()
            logger.warning("ignored an advert from %s: %s", n["id"], e)
            adv = None
        self._adverts[n["id"]] = (at, adv)
        if adv and "prefix_hashes" in adv:  # once per advert: what the peer keeps warm now
            self._set_warm(n["id"], adv["prefix_hashes"], at)
        return adv

    def _set_warm(self, node_id: str, hashes: list[int], at: float) -> None:
        """A node's warm prefixes replace the router's guess about it. Routes
        sent there in the advert period before are kept: queued there, or
        still evaluating their prompt, they are not in its engine's cache yet."""
        since = int(at * 1000) - self.cfg.scheduler.advert_interval_ms
        self.dispatcher.scheduler.set_warm(node_id, hashes, max(0, since))

    def _sync_peers(self) -> None:
        """Feed the scheduler every peer's latest advert and liveness."""
        sched = self.dispatcher.scheduler
        seen: set[str] = set()
        alive = 0
        for n in self.cluster.nodes():
            if n.get("local") or n["id"] == self.node_id:
                continue
            seen.add(n["id"])
            alive += bool(n.get("alive"))
            adv = self._checked_advert(n)
            if adv is None:
                continue  # the peer's previous state stands (and goes stale)
            if adv:  # the peer's API key use since its last advert counts here too
                self.keys.observe_peer(n["id"], adv.get("key_usage", {}))
                self.keys.observe_last_used(adv.get("key_last_used"))
            # a draining peer looks saturated: chosen only when no other holder can take it
            depth, bound = ((1, 1) if adv.get("draining")
                            else (int(adv.get("queue_depth", 0)), int(adv.get("max_queue", 0))))
            sched.update_node(n["id"], bool(n.get("alive")), int((n.get("advert_at") or 0) * 1000),
                              list(adv.get("models", [])), list(adv.get("loaded", [])),
                              int(adv.get("in_flight", 0)), depth, bound,
                              max_loaded_models=int(adv.get("max_loaded_models", 0)),
                              busy=list(adv.get("busy", [])))
        for gone in self._peers - seen:
            sched.remove_node(gone)
            self._adverts.pop(gone, None)
        self._peers = seen
        self.keys.set_entry_nodes(1 + alive)

    async def models_changed(self) -> None:
        self._refresh_local_node()

    def resources(self) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        try:
            du = psutil.disk_usage(str(self.data_dir))
            disk_total, disk_used = du.total, du.used
        except OSError:
            disk_total = disk_used = 0
        cpu = psutil.cpu_percent(interval=None)
        return {
            "cpu": round(cpu / 100, 4), "cpu_percent": cpu, "cpu_count": psutil.cpu_count() or 1,
            "memory": round(vm.percent / 100, 4), "memory_used_bytes": vm.total - vm.available,
            "memory_total_bytes": vm.total,
            "disk": round(disk_used / disk_total, 4) if disk_total else 0.0,
            "disk_used_bytes": disk_used, "disk_total_bytes": disk_total,
            "process_rss_bytes": psutil.Process().memory_info().rss,
        }

    def cluster_status(self) -> dict[str, Any]:
        if self.cluster is None:
            # Alone, without the cluster core: this node decides for itself.
            return {"role": "standalone", "leader_id": self.node_id, "term": 0,
                    "members": [self.node_id], "degraded": False, "peers_connected": 0}
        status: dict[str, Any] = self.cluster.status()
        return status

    def cluster_nodes(self) -> list[dict[str, Any]]:
        me = self.advert()
        local = {
            "id": self.node_id, "name": self.name, "status": "active",
            "role": self.cluster_status()["role"], "address": self.api_url.replace("http://", ""),
            "api_address": self.api_url, "models": me["models"], "loaded_models": me["loaded"],
            "resources": me["resources"], "in_flight": me["in_flight"],
            "queue_depth": me["queue_depth"], "last_seen": time.time(), "local": True,
            "version": __version__, "draining": self.draining,
            "rpc": {"ready": me["rpc_ready"], "memory_mib": me["rpc_memory_mib"]},
        }
        out = [local]
        if self.cluster is not None:
            status = self.cluster.status()
            for n in self.cluster.nodes():
                if n["id"] == self.node_id:
                    continue
                adv = self._checked_advert(n) or {}
                out.append({
                    "id": n["id"], "name": adv.get("name", n["id"]),
                    "status": "active" if n.get("alive") else "down",
                    "role": "leader" if status.get("leader_id") == n["id"] else "follower",
                    "address": (adv.get("api_address") or n.get("api_address") or "").replace("http://", ""),
                    "api_address": adv.get("api_address") or n.get("api_address"),
                    "p2p_address": n.get("p2p_address"),
                    "models": adv.get("models", []), "loaded_models": adv.get("loaded", []),
                    "resources": adv.get("resources", {}), "in_flight": adv.get("in_flight", 0),
                    "queue_depth": adv.get("queue_depth", 0), "last_seen": n.get("last_seen"),
                    "local": False, "version": adv.get("version"), "draining": bool(adv.get("draining")),
                    "rpc": {"ready": bool(adv.get("rpc_ready")), "memory_mib": adv.get("rpc_memory_mib", 0)},
                })
        return out

    async def catalog_entries(self) -> list[dict[str, Any]]:
        """/api/tags entries: the local store (or upstream), plus models only peers hold."""
        from .api.common import iso

        if self.engine.uses_store:
            records = await asyncio.to_thread(self.store.records)
            entries = [{"name": r.name.short, "model": r.name.short, "modified_at": iso(r.modified_at),
                        "size": r.size, "digest": r.digest, "details": r.details} for r in records]
        else:
            entries = [{**m, "model": m.get("model", m["name"])} for m in await self.engine.list_models()]
        seen = {e["name"] for e in entries}
        for n in self.cluster_nodes()[1:]:
            if n["status"] != "active":
                continue
            for m in n["models"]:
                if m not in seen:
                    seen.add(m)
                    entries.append({"name": m, "model": m, "modified_at": iso(n["last_seen"] or 0),
                                    "size": 0, "digest": "", "details": {"remote_node": n["id"]}})
        return entries

    async def cluster_models(self) -> list[dict[str, Any]]:
        by_name: dict[str, dict[str, Any]] = {}
        for e in await self.catalog_entries():
            by_name[e["name"]] = {"name": e["name"], "size": e["size"], "digest": e["digest"],
                                  "nodes": [], "loaded_on": [],
                                  "requests": self.dispatcher.requests_by_model.get(e["name"], 0)}
        for n in self.cluster_nodes():
            if n["status"] != "active":
                continue
            for m in n["models"]:
                by_name.setdefault(m, {"name": m, "size": 0, "digest": "", "nodes": [], "loaded_on": [],
                                       "requests": self.dispatcher.requests_by_model.get(m, 0)})
                by_name[m]["nodes"].append(n["id"])
            for m in n["loaded_models"]:
                if m in by_name:
                    by_name[m]["loaded_on"].append(n["id"])
        if not self.engine.uses_store:
            for m in by_name.values():
                if not m["nodes"]:
                    m["nodes"] = [self.node_id]
        if self.replicator is not None:
            # the catalogue in the Raft state: the version kept and its placement
            for e in self.replicator.catalogue_entries_list():
                m = by_name.get(e["model"])
                if m is None:
                    continue
                m.update({"manifest_digest": f"sha256:{e.get('digest')}", "replicas": e.get("replicas"),
                          "assigned": e.get("assigned", []), "holders": e.get("holders", []),
                          "node_labels": e.get("node_labels", {}), "unplaced": e.get("unplaced", 0),
                          "why_not": e.get("why_not", {})})
                if not m["size"]:
                    m["size"] = int(e.get("size") or 0)
        return sorted(by_name.values(), key=lambda m: m["name"])

    def services(self) -> dict[str, Any]:
        """What this node listens on, with the established TCP connections on each
        port (read from the kernel through psutil, so the count is true)."""
        from urllib.parse import urlsplit

        try:
            conns = psutil.Process().net_connections(kind="tcp")
        except (psutil.Error, OSError):
            conns = []

        def tcp(url: str) -> dict[str, Any] | None:
            if not url:
                return None
            port = urlsplit(url).port or 0
            n = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr
                    and c.laddr.port == port)
            return {"url": url, "port": port, "protocol": "tcp", "connections": n}

        p2p = None
        if self.cluster is not None:
            p2p = {"url": f"quic://{self.cfg.p2p.host}:{self.cfg.p2p.port}", "port": self.cfg.p2p.port,
                   "protocol": "udp", "connections": self.cluster_status().get("peers_connected", 0)}
        # the ggml RPC server: on 127.0.0.1 only, reached by peers only through the cluster
        rpc = self.rpc.status() if self.rpc is not None else None
        # its tunnels (rust/tunnel/): opened to peers' RPC servers, served to peers
        tunnels = self.cluster.rpc_tunnels() if self.cluster is not None else None
        return {"api": tcp(self.api_url), "web": tcp(self.web_url), "p2p": p2p, "rpc": rpc,
                "rpc_tunnels": tunnels}

    def health(self) -> dict[str, Any]:
        from .api.common import now_iso

        c = self.cluster_status()
        nodes = self.cluster_nodes()
        degraded = bool(c.get("degraded")) or not self.ready or not self.supervisor.healthy
        return {
            "status": "degraded" if degraded else "healthy",
            "draining": self.draining,
            # background tasks that ended for good: name -> why (systemd restarts the node)
            "failed_tasks": dict(self.supervisor.dead),
            "timestamp": now_iso(),
            "version": __version__,
            "node_id": self.node_id,
            "uptime_seconds": int(time.time() - self.started_at),
            "services": {
                "api": True,
                "p2p": self.cluster is not None,
                "p2p_peers": c.get("peers_connected", 0),
                "consensus": self.cluster is not None,
                "consensus_leader": c["role"] == "leader",
                "scheduler": True,
                "engine": self.engine.kind,
                "available_nodes": sum(1 for n in nodes if n["status"] == "active"),
            },
        }

    def refresh_cluster_metrics(self) -> None:
        c = self.cluster_status()
        self.metrics.peers.set(c.get("peers_connected", 0))
        self.metrics.is_leader.set(1 if c["role"] in ("leader", "standalone") else 0)
        nodes = self.cluster_nodes()
        self.metrics.cluster_nodes.labels("active").set(sum(1 for n in nodes if n["status"] == "active"))
        self.metrics.cluster_nodes.labels("down").set(sum(1 for n in nodes if n["status"] != "active"))
        self.metrics.websocket_connections.set(self.websocket_connections)
