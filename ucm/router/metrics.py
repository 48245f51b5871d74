"""Prometheus metrics of one router (its own registry, so several routers can live in one process).

What an operator needs to diagnose PD serving: how many requests took the full prefill->decode
path versus the decode-only fallback (and why), which upstreams fail or get ejected, how often
prefix affinity lands on the warm pod, and what the router itself rejects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ucm.router.endpoints import Registry

M = TypeVar("M", bound=MetricWrapperBase)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EndpointCollector(Collector):
    """Endpoint counts by role, revision and availability, computed at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ucm_router_endpoints", "Discovered upstream endpoints", labels=["role", "revision", "available"]
        )
        snapshot = self._registry.snapshot()
        for revision, info in snapshot["revisions"].items():
            for role in ("prefill", "decode"):
                up = sum(1 for e in info[role] if e["available"])
                family.add_metric([role, revision, "true"], up)
                family.add_metric([role, revision, "false"], len(info[role]) - up)
        yield family
        complete = GaugeMetricFamily(
            "ucm_router_complete_revisions", "Revisions with an available prefill and decode endpoint"
        )
        complete.add_metric([], len(snapshot["complete_revisions"]))
        yield complete


class RouterMetrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ucm_router_requests",
            "Client requests by route and final HTTP status",
            ["route", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "ucm_router_request_duration_seconds",
            "Client request duration (to the last byte)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_duration = Histogram(
            "ucm_router_prefill_duration_seconds",
            "Prefill round trip (the time to first token floor)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pd_requests = Counter(
            "ucm_router_pd_requests", "Requests served through prefill then decode", registry=r
        )
        self.fallbacks = Counter(
            "ucm_router_fallbacks", "Requests sent to decode alone, by reason", ["reason"], registry=r
        )
        self.rejected = Counter(
            "ucm_router_rejected", "Requests the router refused itself, by reason", ["reason"], registry=r
        )
        self.upstream = Counter(
            "ucm_router_upstream_requests",
            "Upstream requests by role and outcome",
            ["role", "outcome"],
            registry=r,
        )
        self.ejections = Counter(
            "ucm_router_ejections", "Endpoints ejected after consecutive failures", ["role"], registry=r
        )
        self.affinity = Counter(
            "ucm_router_prefix_affinity",
            "Prefill choices: hit (warm pod), overflow (warm pod too busy), none (no key)",
            ["result"],
            registry=r,
        )
        self.stream_errors = Counter(
            "ucm_router_stream_errors",
            "Streams ended with an error event after an upstream failure",
            registry=r,
        )
        self.client_disconnects = Counter(
            "ucm_router_client_disconnects",
            "Requests abandoned by the client (upstreams cancelled)",
            registry=r,
        )
        # read at scrape time (`track_inflight`): nothing to update per request
        self.inflight = Gauge("ucm_router_inflight_requests", "Requests being served", registry=r)
        self.registry.register(_EndpointCollector(registry))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, memoised: prometheus_client validates and locks on every
        `labels()` call, which the hot path would pay several times per request. Label values
        come from small fixed sets (routes, status codes, outcomes, reasons), so this stays small."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[no-any-return]

    def track_inflight(self, read: Callable[[], float]) -> None:
        self.inflight.set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
