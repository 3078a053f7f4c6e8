"""ClusterService: the node's handle on the Rust cluster core (`_core.Cluster`).

It keeps the contract node.py and the dispatcher rely on: start/stop, status,
nodes, adverts, the inbound handler for requests other nodes forward here, and
`forward()` to send a request to a peer and stream its chunks back. JSON is
encoded and decoded here, once per message; the Rust side treats requests and
chunks as opaque bytes.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import pathlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from .. import _core
from ..errors import ConflictError, EngineError, NotFoundError, OllamaDistributedError, PeerUnavailableError

logger = logging.getLogger(__name__)

InboundHandler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]

# How long a silent peer is kept before it is marked down. Keep-alives go out
# four times within it, so a lost packet or two never drops a healthy peer; a
# node killed with -9 shows as down about this long after its last packet.
DEFAULT_FAILURE_TIMEOUT_S = 2.0
# A forwarded request still running after this long starts watching for the
# caller's cancellation (a future per request is measurable at zero delay).
WATCH_AFTER_S = 0.002
# Chunks of a forwarded answer held for one crossing into the core at most:
# a handler that yields this many without waiting (a zero-delay engine) sends
# them at once rather than holding the whole answer back.
SEND_BATCH = 64

# No core thread may call into Python's logging once the interpreter exits.
atexit.register(_core.stop_logging)


class ClusterService:
    """One node's membership in the cluster; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        data_dir: pathlib.Path,
        host: str,
        port: int,
        join: list[str],
        token: str | None,
        api_address: str,
        failure_timeout: float = DEFAULT_FAILURE_TIMEOUT_S,
        max_voters: int = 5,
    ) -> None:
        self.node_id = node_id
        self.data_dir = pathlib.Path(data_dir)
        self._core = _core.Cluster(
            node_id, str(self.data_dir), host, int(port), list(join), token, api_address,
            int(failure_timeout * 1000), int(max_voters),
        )
        self._handler: InboundHandler | None = None
        self._catalog_text = ""
        self._catalog: dict[str, str] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._started = False

    # ---- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        """Bind the P2P port; create the cluster, join it, or rejoin after a restart.

        Raises PermissionError when a seed refuses the token, RuntimeError for
        anything else that keeps the node out (port busy, no seed answers).
        """
        await self._core.start()
        self._started = True
        self._loop_task = asyncio.create_task(self._inbound_loop(), name="cluster-inbound")
        logger.info("cluster core started: node %s on %s/udp", self.node_id, self.local_address())

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        for t in list(self._serving):
            t.cancel()
        await self._core.stop()
        if self._loop_task is not None:
            # A stopped core answers the pending next_inbound() with None, so the
            # loop ends by itself and no core future is left to resolve into a
            # finished interpreter; cancelled only if it does not.
            await asyncio.wait({self._loop_task}, timeout=1.0)
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._serving.clear()

    @property
    def inbound_task(self) -> asyncio.Task[None] | None:
        """The loop that takes requests peers forward here (supervised by the node)."""
        return self._loop_task

    # ---- state ----------------------------------------------------------------

    def join_token(self) -> str | None:
        token: str | None = self._core.join_token()
        return token

    async def rotate_join_token(self) -> str:
        """A new join secret for the whole cluster, committed through Raft;
        the new token. Tokens given out before stop working on every member."""
        token: str = await self._core.rotate_join_token()
        return token

    def local_address(self) -> str | None:
        addr: str | None = self._core.local_address()
        return addr

    def status(self) -> dict[str, Any]:
        """role, leader_id, term, members, voters, learners, degraded, peers_connected, counters."""
        status: dict[str, Any] = json.loads(self._core.status_json())
        return status

    def nodes(self) -> list[dict[str, Any]]:
        """Every known node: id, api_address, p2p_address, alive, last_seen, advert (+ advert_at, voter, local)."""
        nodes: list[dict[str, Any]] = json.loads(self._core.nodes_json())
        return nodes

    def publish_advert(self, advert: dict[str, Any]) -> None:
        self._core.publish_advert(json.dumps(advert, separators=(",", ":")).encode())

    # ---- model blobs between peers ---------------------------------------------

    def configure_blobs(self, models_dir: pathlib.Path, bandwidth_mbps: int = 0) -> None:
        """Serve and store blobs under the model store's root; cap transfers at
        `bandwidth_mbps` megabits per second in and out (0: no cap)."""
        self._core.configure_blobs(str(models_dir), int(bandwidth_mbps) * 125_000)

    async def fetch_blob(self, node_ids: str | list[str], digest: str) -> pathlib.Path:
        """Fetch blob `digest` into the store from `node_ids`: in ranges from all
        of them at once when it is 16 MiB or more, else one after another; sha256
        verified and renamed into place only when whole; a partial from an
        earlier attempt is resumed. DigestMismatchError when the peer's bytes are not the digest
        (the partial is discarded), PeerUnavailableError when the stream broke
        (the partial is kept), ModelNotFoundError when the peer lacks it."""
        peers = [node_ids] if isinstance(node_ids, str) else list(node_ids)
        return pathlib.Path(await self._core.fetch_blob(peers, digest))

    async def fetch_manifest(self, node_id: str, path: str, digest: str | None = None) -> bytes:
        """Manifest `registry/namespace/name/tag` from `node_id`, checked against `digest`."""
        data: bytes = await self._core.fetch_manifest(node_id, path, digest)
        return data

    async def put_tombstone(self, model: str, deleted_at: float) -> None:
        """Commit "`model` was deleted at `deleted_at` (unix s)" in the Raft state.
        RuntimeError without a quorum."""
        await self._core.put_tombstone(model, int(deleted_at * 1000))

    async def propose_catalog(self, expect: list[tuple[str, str | None]],
                              puts: list[tuple[str, str | None]]) -> bool:
        """Compare-and-set on the catalogue in the Raft state, through the leader:
        False when a key no longer holds what `expect` says. RuntimeError without a quorum."""
        ok: bool = await self._core.propose_catalog(expect, puts)
        return ok

    async def remove_node(self, node_id: str) -> None:
        """Remove a node that is down from the cluster: it leaves the Raft
        membership (a voter's place goes to a caught-up learner), so it no
        longer counts toward a quorum. NotFoundError for a node that is not a
        member, ConflictError for one that is up or this node, RuntimeError
        when the change cannot be committed (no quorum)."""
        known = {n["id"]: n for n in self.nodes()}
        if node_id not in known:
            raise NotFoundError(f"node '{node_id}' not found; see GET /api/distributed/nodes")
        if node_id == self.node_id:
            raise ConflictError("a node cannot remove itself; stop it, then remove it from another node")
        if known[node_id].get("alive"):
            raise ConflictError(f"node '{node_id}' is up; stop it first (systemctl stop ollama-distributed "
                                "on it), then remove it")
        await self._core.remove_member(node_id)

    # ---- leadership handover (rust/consensus/handover.rs) ----------------------

    def successors(self) -> list[str]:
        """Voters that could lead after this leader: caught up and connected;
        empty when this node is not the leader."""
        names: list[str] = self._core.successors()
        return names

    def hold_candidacy(self, held: bool) -> None:
        """While held, this node never stands for election (a draining leader
        does not take back the lead it handed over)."""
        self._core.hold_candidacy(held)

    async def campaign(self) -> None:
        """Stand for election now: a draining leader hands over to this node."""
        await self._core.campaign()

    def catalog_text(self) -> str:
        """The catalogue as the core's JSON text, undecoded: a reader that
        polls it compares the text and decodes only when it changed."""
        text: str = self._core.catalog_json()
        return text

    def catalog(self) -> dict[str, str]:
        """The catalogue in the Raft state: key -> JSON text (a copy: decoded
        again only when the core's text changed, which with 10,000 API keys in
        it saves ~20 ms a call)."""
        text = self.catalog_text()
        if text != self._catalog_text:
            self._catalog = json.loads(text)
            self._catalog_text = text
        return dict(self._catalog)

    def tombstones(self) -> dict[str, float]:
        """Deleted models in the Raft state: name -> unix seconds."""
        raw: dict[str, int] = json.loads(self._core.tombstones_json())
        return {k: v / 1000 for k, v in raw.items()}

    def transfers(self) -> dict[str, Any]:
        """Blob transfers in progress (direction, peer, digest, offset, bytes, total,
        elapsed_s, bytes_per_sec) and totals since start."""
        st: dict[str, Any] = json.loads(self._core.transfer_status_json())
        return st

    # ---- ggml RPC tunnels (split models, issue 16) ---------------------------

    def set_rpc_port(self, port: int | None) -> None:
        """Bridge peers' RPC tunnels to this node's RPC server on 127.0.0.1:`port`;
        None refuses them (engine.rpc_server off, or its server not serving)."""
        self._core.set_rpc_port(port)

    def open_rpc_tunnel(self, node_id: str) -> int:
        """A loopback port whose connections reach `node_id`'s RPC server through
        the pair's mTLS QUIC connection. PeerUnavailableError when not connected."""
        return self._core.open_rpc_tunnel(node_id)

    def close_rpc_tunnel(self, port: int) -> bool:
        return self._core.close_rpc_tunnel(port)

    def rpc_tunnels(self) -> dict[str, Any]:
        """{"open": [{port, peer, bytes_sent, bytes_received, connections, active,
        failures}], "served": {rpc_port, streams, active, refused, bytes_in, bytes_out}}."""
        st: dict[str, Any] = json.loads(self._core.rpc_tunnels_json())
        return st

    # ---- forwarding -----------------------------------------------------------

    def set_inbound_handler(self, handler: InboundHandler) -> None:
        self._handler = handler

    async def forward(self, node_id: str, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Run `request` on `node_id` and yield its chunks as they arrive.

        Closing or abandoning the iterator cancels the work at the peer. A peer
        that cannot be reached raises PeerUnavailableError (retryable while no
        chunk was yielded); a peer's own error is raised as the same error
        class and status it would have had locally.
        """
        body = json.dumps(request, separators=(",", ":")).encode()
        stream = self._core.forward_now(node_id, body) or await self._core.forward(node_id, body)
        try:
            done = False
            while not done:
                # what has already arrived costs no trip through the event loop
                batch, done = stream.recv_now() or await stream.recv()
                for chunk in batch:
                    yield json.loads(chunk)
        finally:
            stream.cancel()

    async def _inbound_loop(self) -> None:
        while True:
            item = self._core.next_inbound_now() or await self._core.next_inbound()
            if item is None:
                return
            request, caller, reply = item
            task = asyncio.create_task(self._serve(request, caller, reply))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, raw: bytes, caller: str, reply: Any) -> None:
        if self._handler is None:
            reply.error(503, "this node does not serve forwarded requests yet")
            return
        me = asyncio.current_task()
        watcher: asyncio.Future[Any] | None = None

        def on_cancel(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and me is not None and not me.done():
                me.cancel()

        def watch() -> None:
            nonlocal watcher
            watcher = asyncio.ensure_future(reply.cancelled())
            watcher.add_done_callback(on_cancel)

        # Most forwarded requests that finish at once never need a watcher;
        # one that runs longer gets it after WATCH_AFTER_S. Until then a
        # cancelled caller is seen by send() returning False.
        loop = asyncio.get_running_loop()
        timer = loop.call_later(WATCH_AFTER_S, watch)
        # Chunks cross into the core in batches: those the handler yields
        # within one turn of the event loop go together when it next waits
        # (or at SEND_BATCH), one crossing and one wake-up of the writer
        # instead of one per token, and no added delay.
        pending: list[bytes] = []
        flushing: asyncio.Handle | None = None
        gone = False

        def flush() -> None:
            nonlocal flushing, gone
            flushing = None
            if pending and not gone:
                gone = not reply.send_many(pending)
            pending.clear()

        try:
            request = json.loads(raw)
            agen = self._handler(request)
            try:
                async for chunk in agen:
                    pending.append(json.dumps(chunk, separators=(",", ":")).encode())
                    if len(pending) >= SEND_BATCH:
                        flush()
                    elif flushing is None:
                        flushing = loop.call_soon(flush)
                    if gone:
                        return
            finally:
                aclose = getattr(agen, "aclose", None)
                if aclose is not None:
                    await aclose()
            flush()
            reply.end()
        except asyncio.CancelledError:
            logger.debug("forwarded request from %s cancelled by the caller", caller)
        except OllamaDistributedError as e:
            flush()  # what the handler yielded before it failed goes first
            reply.error(e.status, e.message)
        except json.JSONDecodeError as e:
            reply.error(400, f"malformed forwarded request: {e}")
        except Exception as e:  # an engine bug must not kill the inbound loop
            logger.exception("forwarded request from %s failed", caller)
            flush()
            reply.error(EngineError.status, str(e) or type(e).__name__)
        finally:
            pending.clear()  # a flush still scheduled finds nothing to send
            if flushing is not None:
                flushing.cancel()
            timer.cancel()
            if watcher is not None:
                watcher.cancel()


__all__ = ["ClusterService", "PeerUnavailableError"]
