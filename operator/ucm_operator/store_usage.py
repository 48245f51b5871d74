"""Store usage for the UCMCluster status, computed from the workers' own vLLM /metrics texts.

Each worker exports its store's footprint as `vllm:ucm_store_*` gauges, whether the store's
volume answers as `vllm:ucm_store_unreachable_seconds`, and its lookups as the connector's
`vllm:ucm_lookup_tokens` / `vllm:ucm_hit_tokens` counters (docs/metrics.md). The operator reads
those texts the way signals.py reads the routers' (pod IPs it already lists: no new RBAC, no
cluster-wide read, no privilege in any pod). This module is the pure part: parse the texts, and
compute `status.store` and the `StoreHealthy` condition.

The status is computed, not accumulated: capacity, bytes and blocks are the latest gauges; the hit
rate is over the window since the previous scrape, from counter deltas the operator keeps in memory
(`Window`). A restarted operator has no previous sample, so its first scrape reports no hit rate
rather than a lifetime one; a restarted pod (its counter went down) counts from zero.
"""

from __future__ import annotations

import dataclasses
import errno
import re
from collections.abc import Mapping
from typing import Any

CAPACITY = "vllm:ucm_store_capacity_bytes"
USED = "vllm:ucm_store_used_bytes"
BLOCKS = "vllm:ucm_store_blocks"
EVICTIONS = "vllm:ucm_store_evictions"
READ_ONLY = "vllm:ucm_store_read_only_errno"
UNREACHABLE = "vllm:ucm_store_unreachable_seconds"
LOOKUP = "vllm:ucm_lookup_tokens_total"
HIT = "vllm:ucm_hit_tokens_total"
GAUGES = (CAPACITY, USED, BLOCKS, EVICTIONS, READ_ONLY, UNREACHABLE)
REQUIRED = (USED, BLOCKS, READ_ONLY)

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[^}]*\})?\s+(?P<value>\S+)(?:\s+\S+)?$")


@dataclasses.dataclass(frozen=True)
class PodSample:
    """One worker pod's store gauges and lookup counters, as parsed from its /metrics."""

    capacity_bytes: float | None
    used_bytes: float
    blocks: float
    evictions: float
    read_only_errno: int  # 0: the store accepts dumps
    unreachable_seconds: float  # 0: the store's root answered the pod's last probe
    lookup_tokens: float
    hit_tokens: float


def parse_pod(pod: str, text: str) -> PodSample | None:
    """The store sample in one pod's /metrics text; None when the connector is there but has not
    reported its store yet (a worker reports with its first step). A text without the connector's
    metrics, or with only some of the store gauges, is an error naming the pod and the metric: a
    pod that does not report must not read as an empty store."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        name = m.group("name")
        if name not in GAUGES and name not in (LOOKUP, HIT):
            continue
        try:
            value = float(m.group("value"))
        except ValueError as exc:
            raise ValueError(f"pod {pod}: {name} has a non-numeric value {m.group('value')!r}") from exc
        # One child per engine: counters add up; the engines of a pod share one store, so gauges
        # take the largest (any engine's read-only or unreachable shows).
        values[name] = values.get(name, 0.0) + value if name in (LOOKUP, HIT) else max(values.get(name, value), value)
    if LOOKUP in values and not any(name in values for name in REQUIRED):
        return None
    for name in REQUIRED:
        if name not in values:
            raise ValueError(f"pod {pod}: no {name} sample in its /metrics (is UCMConnector its --kv-transfer-config?)")
    cap = values.get(CAPACITY)
    return PodSample(
        capacity_bytes=cap if cap and cap > 0 else None,
        used_bytes=values[USED],
        blocks=values[BLOCKS],
        evictions=values.get(EVICTIONS, 0.0),
        read_only_errno=int(values[READ_ONLY]),
        unreachable_seconds=values.get(UNREACHABLE, 0.0),
        lookup_tokens=values.get(LOOKUP, 0.0),
        hit_tokens=values.get(HIT, 0.0),
    )


@dataclasses.dataclass(frozen=True)
class Window:
    """The previous scrape's lookup/hit counters per pod: what the next hit rate is a delta from."""

    counters: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


def _delta(now: float, before: float | None) -> float:
    # A counter that went down belongs to a restarted pod: it counts from zero.
    return now if before is None or now < before else now - before


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}%"


def compute_store_usage(samples: Mapping[str, PodSample | None], errors: Mapping[str, str], window: Window,
                        expected_pods: int) -> tuple[dict[str, Any], dict[str, str], Window]:
    """`status.store`, the `StoreHealthy` condition (type/status/reason/message) and the next window.

    Every pool shares one store volume, so the footprint is the largest any pod reports (each pod
    indexes the same directory); evictions are per pod and summed. StoreHealthy is False when any
    pod's store went read-only (ENOSPC, EACCES, EROFS) or cannot reach the store's volume; Unknown
    when no pod's metrics could be read, none has reported its store yet, or there is no Ready
    worker pod to ask. `samples` maps a pod to None when it answered but has not reported yet."""
    pending = sorted(pod for pod, s in samples.items() if s is None)
    reported = {pod: s for pod, s in samples.items() if s is not None}
    usage: dict[str, Any] = {}
    lookups = hits = 0.0
    counters: dict[str, tuple[float, float]] = {}
    for pod, s in sorted(reported.items()):
        before = window.counters.get(pod)
        counters[pod] = (s.lookup_tokens, s.hit_tokens)
        if before is not None:
            lookups += _delta(s.lookup_tokens, before[0])
            hits += _delta(s.hit_tokens, before[1])
    if reported:
        caps = [s.capacity_bytes for s in reported.values() if s.capacity_bytes is not None]
        used = max(s.used_bytes for s in reported.values())
        usage["usedBytes"] = int(used)
        usage["blocks"] = int(max(s.blocks for s in reported.values()))
        usage["evictions"] = int(sum(s.evictions for s in reported.values()))
        if caps:
            usage["capacityBytes"] = int(max(caps))
            usage["usedPercent"] = _percent(used / max(caps))
        usage["lookupTokens"] = int(lookups)
        if lookups > 0:
            usage["hitRate"] = _percent(hits / lookups)
        usage["reportingPods"] = len(reported)
    if errors:
        first = sorted(errors.items())[0]
        usage["message"] = f"{len(errors)} of {expected_pods} worker pod(s) unread; {first[0]}: {first[1]}"
    read_only = sorted((pod, s.read_only_errno) for pod, s in reported.items() if s.read_only_errno)
    unreachable = sorted(pod for pod, s in reported.items() if s.unreachable_seconds > 0)
    if read_only:
        pods = ", ".join(f"{pod} ({errno.errorcode.get(code, f'errno {code}')})" for pod, code in read_only)
        condition = _condition("False", "ReadOnly", f"the store refuses writes (saves are dropped, loads work) in {pods}")
    elif unreachable:
        condition = _condition("False", "Unreachable", "the store's volume does not answer in " + ", ".join(unreachable))
    elif not reported and pending:
        condition = _condition("Unknown", "NotReported", f"{', '.join(pending)} answered but has not reported its "
                               "store yet (a worker reports with its first request)")
    elif not reported and errors:
        first = sorted(errors.items())[0]
        condition = _condition("Unknown", "MetricsUnavailable",
                               f"no worker pod's /metrics could be read; {first[0]}: {first[1]}")
    elif not reported:
        condition = _condition("Unknown", "NoWorkers", "no Ready worker pod to read store metrics from")
    else:
        condition = _condition("True", "Writable", f"{len(reported)} worker pod(s) report a reachable, writable store")
    return usage, condition, Window(counters=counters)


def _condition(status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": "StoreHealthy", "status": status, "reason": reason, "message": message}
