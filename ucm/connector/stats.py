"""Connector statistics in vLLM 0.32's connector-stats mechanism.

Workers and the scheduler each return a `UCMConnectorStats` from `get_kv_connector_stats`; vLLM
aggregates them (`aggregate`), logs `reduce()` periodically ("KV Transfer metrics: ...") and feeds
the raw data to `UCMPromMetrics.observe`, which exports Prometheus counters - so hit tokens,
loaded/saved bytes and the achieved GB/s show up on vLLM's own /metrics endpoint.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import Any

from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from ucm.connector.store_probe import StoreProbe

COUNTERS = (
    "lookup_tokens",  # prompt tokens the scheduler asked the store about
    "hit_tokens",  # of those, tokens found in the store (external prefix hits)
    "loaded_blocks",
    "loaded_bytes",
    "load_seconds",  # wall time from store read start to data usable on the device
    "load_failures",  # blocks that failed to load and were recomputed
    "saved_blocks",
    "saved_bytes",
    "save_seconds",  # wall time from gather start to the dump being handed to the store
    # sparse offload (ucm.sparse: UcmSparseBase.take_counters), per worker
    "sparse_offloaded_blocks",  # blocks whose GPU copy was freed, their KV left in the store
    "sparse_slot_loads",  # (layer, block) placed into a slot for attention
    "sparse_store_reads",  # whole blocks read back from the store on a layer's critical path
    "sparse_prefetched",  # whole blocks read ahead of need
    "sparse_slot_shortfall",  # selected (layer, block) left out for want of a slot
    "sparse_lost_blocks",  # offloaded blocks found gone from the store (attention leaves them out)
    # window extrapolation (ucm.window), per worker
    "rerope_queries",  # query tokens past the window, attended with ReRoPE (counted once per step, not per layer)
    # cache blend (ucm.blend), per worker
    "blend_reused_tokens",  # prompt tokens whose KV came from a stored chunk, not from a prefix hit
    "blend_recomputed_tokens",  # of those, the ones the check layer's deviation picked to recompute
    "blend_failed_reads",  # steps whose chunk read failed and were computed in full
)


# Store footprint gauges (ucm.store StoreStats), refreshed by the worker every few seconds and
# exported as vllm:ucm_<name>; None when not refreshed this interval. TP workers of one engine
# share the store, so aggregate keeps the largest value (read_only: any worker's).
GAUGES = (
    "store_capacity_bytes",  # the store's configured capacity (0: unbounded)
    "store_used_bytes",  # bytes stored, as this worker's index sees the shared volume
    "store_blocks",  # objects stored, likewise
    "store_evictions",  # blocks this worker's store evicted since it started
    "store_read_only_errno",  # 0 while dumps are accepted; once refused, the errno why (28: ENOSPC)
)


def _zero() -> dict[str, Any]:
    return {k: 0 for k in COUNTERS}


def store_gauges(stats: Any) -> dict[str, float]:
    """The gauge values from a `ucm.store.StoreStats` (duck-typed: stats.py imports no store)."""
    return {
        "store_capacity_bytes": float(stats.capacity_bytes or 0),
        "store_used_bytes": float(stats.bytes),
        "store_blocks": float(stats.blocks),
        "store_evictions": float(stats.evictions),
        "store_read_only_errno": float(_errno_of(stats.read_only_reason)),
    }


def _errno_of(reason: str | None) -> int:
    """The errno a read-only reason starts with ("ENOSPC: No space left ... writing PATH")."""
    if not reason:
        return 0
    return int(getattr(errno, reason.split(":", 1)[0].strip(), 0)) or errno.EIO


@dataclass
class UCMConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        base = _zero()
        base.update(self.data)
        self.data = base

    def add(self, key: str, value: float) -> None:
        self.data[key] += value

    def reset(self) -> None:
        self.data = _zero()

    def set_gauges(self, values: dict[str, float]) -> None:
        """Record the store's footprint for this interval (keys from GAUGES)."""
        for key in GAUGES:
            self.data[key] = values[key]

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in COUNTERS:
            self.data[key] += other.data.get(key, 0)
        for key in GAUGES:
            theirs = other.data.get(key)
            if theirs is not None:
                mine = self.data.get(key)
                self.data[key] = theirs if mine is None else max(mine, theirs)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()
                                       if v is not None}
        out["hit_rate"] = round(d["hit_tokens"] / d["lookup_tokens"], 4) if d["lookup_tokens"] else 0.0
        out["load_gbps"] = round(d["loaded_bytes"] / d["load_seconds"] / 1e9, 3) if d["load_seconds"] else 0.0
        out["save_gbps"] = round(d["saved_bytes"] / d["save_seconds"] / 1e9, 3) if d["save_seconds"] else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(v for k, v in self.data.items() if k in COUNTERS) and not any(
            self.data.get(k) is not None for k in GAUGES)

    def take(self) -> UCMConnectorStats | None:
        """The stats since the last call (None when nothing happened), and start a new interval."""
        if self.is_empty():
            return None
        snapshot = UCMConnectorStats(data=dict(self.data))
        self.reset()
        return snapshot


class UCMPromMetrics(KVConnectorPromMetrics):
    """`vllm:ucm_*` counters and throughput gauges, one child per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {}
        for key in COUNTERS:
            metric = self._counter_cls(
                name=f"vllm:ucm_{key}",
                documentation=f"UCM connector: {key.replace('_', ' ')} (total).",
                labelnames=labelnames,
            )
            self.counters[key] = create_metric_per_engine(metric, per_engine_labelvalues)
        self.gauges: dict[str, dict[int, Any]] = {}
        for key, doc in (
            ("load_gbps", "store-to-device load throughput of the last interval (GB/s)"),
            ("save_gbps", "device-to-store save throughput of the last interval (GB/s)"),
            ("hit_rate", "fraction of looked-up prompt tokens found in the store (last interval)"),
        ):
            gauge = self._gauge_cls(
                name=f"vllm:ucm_{key}", documentation=f"UCM connector: {doc}.", labelnames=labelnames
            )
            self.gauges[key] = create_metric_per_engine(gauge, per_engine_labelvalues)
        # The footprint gauges get their per-engine child at the worker's first report, not now:
        # until then there is no sample, which the operator reads as "not reported yet" rather
        # than as an empty store (workers report only with a step's output).
        self.store_gauges: dict[str, Any] = {}
        self._labelvalues = per_engine_labelvalues
        for key in GAUGES:
            self.store_gauges[key] = self._gauge_cls(
                name=f"vllm:ucm_{key}",
                documentation=f"UCM store: {key.removeprefix('store_').replace('_', ' ')} (latest).",
                labelnames=labelnames,
            )
        unreachable = self._gauge_cls(
            name="vllm:ucm_store_unreachable_seconds",
            documentation="UCM store: 0 while the store's root answers a stat, else seconds since it last did.",
            labelnames=labelnames,
        )
        self.unreachable = create_metric_per_engine(unreachable, per_engine_labelvalues)
        self.probe = _start_probe(vllm_config, self.unreachable)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        stats = UCMConnectorStats(data=dict(transfer_stats_data))
        for key in COUNTERS:
            value = stats.data[key]
            if value:
                self.counters[key][engine_idx].inc(value)
        reduced = stats.reduce()
        for key, gauge in self.gauges.items():
            if reduced[key]:
                gauge[engine_idx].set(reduced[key])
        for key, gauge in self.store_gauges.items():
            value = transfer_stats_data.get(key)
            if value is not None:  # zero is a value here (read-only 0 after a recovery)
                gauge.labels(*self._labelvalues[engine_idx]).set(value)


_probes: dict[str, StoreProbe] = {}
_probes_lock = threading.Lock()


def _start_probe(vllm_config: VllmConfig, gauges: dict[int, Any]) -> StoreProbe | None:
    """One probe of the configured store per process (store_probe.py), feeding every engine's gauge."""
    ktc = vllm_config.kv_transfer_config
    extra = (ktc.kv_connector_extra_config if ktc is not None else None) or {}
    path = extra.get("store_path")
    if not isinstance(path, str) or not path:
        return None

    def update(seconds: float) -> None:
        for child in gauges.values():
            child.set(seconds)

    with _probes_lock:
        probe = _probes.get(path)
        if probe is None:
            probe = _probes[path] = StoreProbe(path).start()
    probe.listen(update)
    return probe
