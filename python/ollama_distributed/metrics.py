"""Prometheus metrics, named by Prometheus conventions: `ollama_distributed_`
prefix, base units (seconds), `_total` on counters. One registry per node so
several nodes can live in one test process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__

# `_created` gauges double the series count and Prometheus does not use them
# from the text format; leave them out.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Buckets for whole requests on a CPU: from a cached short answer to a long one.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time to first token: mostly prompt evaluation, plus queueing and loading.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ClusterCounters(Collector):
    """The cluster core's own counters, read from its status at scrape time
    (they live in Rust; copying them into Python counters would drift)."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self._status()
        if not s:
            return
        p = "ollama_distributed"
        refused = CounterMetricFamily(f"{p}_peer_refusals", "Peers refused at the QUIC port, by reason.",
                                      labels=["reason"])
        refused.add_metric(["bad_token"], float(s.get("joins_refused", 0)))
        refused.add_metric(["no_certificate"], float(s.get("unauthenticated_refused", 0)))
        # impersonation_hello/advert/raft, denied_certificate, unauthenticated_limit, join_too_large
        for reason, n in (s.get("peers_refused") or {}).items():
            refused.add_metric([str(reason)], float(n))
        yield refused
        yield CounterMetricFamily(f"{p}_peer_joins", "Nodes admitted with a join token.",
                                  value=float(s.get("joins_accepted", 0)))
        forwards = CounterMetricFamily(f"{p}_peer_forwards", "Requests relayed over QUIC, by direction.",
                                       labels=["direction"])
        forwards.add_metric(["in"], float(s.get("forwards_in", 0)))
        forwards.add_metric(["out"], float(s.get("forwards_out", 0)))
        yield forwards
        yield CounterMetricFamily(f"{p}_peers_down", "Times a peer was marked down.",
                                  value=float(s.get("peers_down_total", 0)))


class ReplicationCounters(Collector):
    """Peer-to-peer model transfers (`cluster/replication.py`, `rust/blobs`),
    read from the replicator's status at scrape time like ClusterCounters."""

    def __init__(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        if not s:
            return
        t = s.get("totals", {})
        p = "ollama_distributed_replication"
        moved = CounterMetricFamily(f"{p}_bytes", "Blob bytes moved between peers, by direction.",
                                    labels=["direction"])
        moved.add_metric(["in"], float(t.get("bytes_in", 0)))
        moved.add_metric(["out"], float(t.get("bytes_out", 0)))
        yield moved
        blobs = CounterMetricFamily(f"{p}_blobs", "Blob transfers finished, by direction and outcome.",
                                    labels=["direction", "outcome"])
        blobs.add_metric(["in", "ok"], float(t.get("completed_in", 0)))
        blobs.add_metric(["in", "failed"], float(t.get("failed_in", 0)))
        blobs.add_metric(["out", "ok"], float(t.get("completed_out", 0)))
        yield blobs
        yield CounterMetricFamily(f"{p}_digest_mismatches", "Blobs from a peer that were not their digest.",
                                  value=float(t.get("digest_mismatches", 0)))
        yield CounterMetricFamily(f"{p}_models", "Models copied here from a peer.",
                                  value=float(s.get("models_replicated_total", 0)))
        yield CounterMetricFamily(f"{p}_deletes", "Models removed here because they were deleted elsewhere.",
                                  value=float(s.get("models_deleted_total", 0)))
        yield CounterMetricFamily(f"{p}_trims", "Extra copies dropped here once the placed ones were there.",
                                  value=float(s.get("models_trimmed_total", 0)))
        yield GaugeMetricFamily(f"{p}_copies_unplaced", "Copies the placement wants but no node can hold "
                                "(memory, disk, labels, too few nodes).", value=float(s.get("copies_unplaced", 0)))


class RoutingCounters(Collector):
    """The Rust router's decisions by reason, read at scrape time."""

    def __init__(self, decisions: Callable[[], dict[str, int]]) -> None:
        self._decisions = decisions

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily(
            "ollama_distributed_routing_decisions",
            "Requests routed, by reason: prefix_hit (to the node with the longest warm prompt prefix), "
            "load (no node had more of it than another), spread (a node with more of it warm was "
            "passed over for its load, so the prefix spreads to a second node).", labels=["reason"])
        for reason, n in sorted(self._decisions().items()):
            c.add_metric([reason], float(n))
        yield c


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "ollama_distributed"
        self.requests = Counter(f"{p}_requests", "Requests handled, by model, endpoint and HTTP status.",
                                ["model", "endpoint", "status"], registry=r)
        self.request_duration = Histogram(f"{p}_request_duration_seconds",
                                          "Time from request to last byte.", ["endpoint"],
                                          buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds",
                              "Time from request to its first generated token.", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens evaluated.", ["model"],
                                     registry=r)
        # where the engine ran, from its own counts (a forwarded request counts on the serving node)
        self.prompt_tokens_cached = Counter(f"{p}_prompt_tokens_cached", "Prompt tokens whose KV an engine "
                                            "already held (a warm prefix), by model.", ["model"], registry=r)
        self.prompt_tokens_evaluated = Counter(f"{p}_prompt_tokens_evaluated", "Prompt tokens an engine "
                                               "evaluated, by model.", ["model"], registry=r)
        self.generated_tokens = Counter(f"{p}_generated_tokens", "Tokens generated.", ["model"],
                                        registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests waiting for an engine slot.", registry=r)
        self.in_flight = Gauge(f"{p}_in_flight_requests", "Requests running on this node.", registry=r)
        self.models_loaded = Gauge(f"{p}_models_loaded", "Models loaded in the engine.", registry=r)
        self.model_load = Histogram(f"{p}_model_load_seconds", "Time to load a model.", ["model"],
                                    buckets=LOAD_BUCKETS, registry=r)
        self.peers = Gauge(f"{p}_peers", "Peers connected over QUIC.", registry=r)
        self.is_leader = Gauge(f"{p}_is_leader", "1 when this node leads the cluster.", registry=r)
        self.cluster_nodes = Gauge(f"{p}_cluster_nodes", "Nodes known to the cluster, by state.",
                                   ["state"], registry=r)
        self.forwarded = Counter(f"{p}_forwarded_requests", "Requests sent to a peer, by peer and outcome.",
                                 ["peer", "outcome"], registry=r)
        self.peer_adverts_rejected = Counter(
            f"{p}_peer_adverts_rejected", "Peer adverts ignored because a field had a wrong type or range.",
            ["reason"], registry=r)
        self.stream_timeouts = Counter(
            f"{p}_stream_timeouts", "Streams ended because no chunk came in time, by phase.",
            ["phase"], registry=r)
        self.migrations = Counter(
            f"{p}_migrations", "Requests moved to another holder after a node failed them: before their "
            "first chunk (new) or mid-stream, resumed after the tokens already sent (ongoing).",
            ["type"], registry=r)
        self.websocket_connections = Gauge(f"{p}_websocket_connections",
                                           "Dashboard WebSocket clients connected.", registry=r)
        # key: the API key's name (never the key), "config" for api.auth_tokens,
        # "-" when none was accepted; outcome: ok, unauthorized, forbidden,
        # rate_limited, bad_origin, bad_host
        self.auth_requests = Counter(f"{p}_auth_requests", "Requests checked at the HTTP ports, by API key "
                                     "name and outcome.", ["key", "outcome"], registry=r)
        self.build_info = Info(f"{p}_build", "Version of this node.", registry=r)
        self.build_info.info({"version": __version__})

    def bind_cluster(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self.registry.register(ClusterCounters(status))

    def bind_replication(self, status: Callable[[], dict[str, Any] | None]) -> None:
        self.registry.register(ReplicationCounters(status))

    def bind_routing(self, decisions: Callable[[], dict[str, int]]) -> None:
        self.registry.register(RoutingCounters(decisions))

    def bind(self, *, queue_depth: Callable[[], float], in_flight: Callable[[], float],
             models_loaded: Callable[[], float]) -> None:
        """Gauges read live at scrape time rather than tracked on every change."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        self.models_loaded.set_function(models_loaded)
