"""Connector statistics in vLLM 0.32's connector-stats mechanism.

Workers and the scheduler each return a `UCMConnectorStats` from `get_kv_connector_stats`; vLLM
aggregates them (`aggregate`), logs `reduce()` periodically ("KV Transfer metrics: ...") and feeds
the raw data to `UCMPromMetrics.observe`, which exports Prometheus counters - so hit tokens,
loaded/saved bytes and the achieved GB/s show up on vLLM's own /metrics endpoint.
"""

from __future__ import annotations

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


def _zero() -> dict[str, Any]:
    return {k: 0 for k in COUNTERS}


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

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in COUNTERS:
            self.data[key] += other.data.get(key, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
        out["hit_rate"] = round(d["hit_tokens"] / d["lookup_tokens"], 4) if d["lookup_tokens"] else 0.0
        out["load_gbps"] = round(d["loaded_bytes"] / d["load_seconds"] / 1e9, 3) if d["load_seconds"] else 0.0
        out["save_gbps"] = round(d["saved_bytes"] / d["save_seconds"] / 1e9, 3) if d["save_seconds"] else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())

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
