"""The autoscaling decision for one UCMCluster as a pure function: load signal, policy, the pools'
current sizes, the Ready pods per revision and the recent recommendations in; the new size of
every pool out. No clock, no API, no I/O, so every rule below is tested without a cluster
(tests/operator/test_operator_autoscale.py).

Rules, and why:
- **Decode follows the signal, prefill follows decode at the ratio.** The router's in-flight
  requests are what decode pods hold for the whole stream; prefill work per request is a
  fraction of that which the ratio expresses. Deriving prefill from decode (instead of scaling
  each on its own signal) is what keeps `prefill : decode` within one replica of the target at
  every step, including while stabilising.
- **Stabilisation is applied to the decode recommendation only**, HPA-style: scaling up takes the
  lowest recommendation of the up-window (a spike must last), scaling down the highest of the
  down-window (a dip must last). Prefill is derived afterwards, so the windows cannot skew the
  ratio. Without history (a new policy, a restarted operator) the current size counts as
  recommended now: nothing shrinks before a whole down-window has seen the lower load.
- **Never scale in the last Ready same-revision prefill+decode pair.** The Deployment controller
  picks which pods go; during a rollout it may take the Ready pods of the revision that is
  serving. So a scale-in is allowed only if, even when every removed pod is a Ready pod of the
  revision with the most Ready pairs, that revision keeps a Ready prefill and a Ready decode
  pod. Otherwise the whole scale-in waits (both roles, so the ratio holds), and scale-out is
  never held back.
- Bounds: each pool's min/max; a role's total is split across its pools by water-filling, so no
  pool leaves its bounds and the split is deterministic.

Not here: reading the signal (`parse_router_inflight` parses the router's own /metrics text,
ucm/router/metrics.py's `ucm_router_inflight_requests`) and draining (the Deployment's pod
termination removes the pod from its EndpointSlice, which the router watches, before vLLM gets
SIGTERM's grace period to finish its streams).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from .compat import Problem
from .spec import ClusterSpec

INFLIGHT_METRIC = "ucm_router_inflight_requests"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)(?:\s+\S+)?$")


class PolicyError(ValueError):
    """An autoscaling policy that can never be met; `field` names it (spec.autoscaling...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class PoolBounds:
    name: str
    role: str            # "prefill" or "decode"
    min_replicas: int
    max_replicas: int


@dataclasses.dataclass(frozen=True)
class Policy:
    pools: tuple[PoolBounds, ...]
    ratio_prefill: int = 1             # target prefill : decode, e.g. 1 : 2
    ratio_decode: int = 1
    target_inflight_per_decode: float = 8.0
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0

    def role(self, role: str) -> tuple[PoolBounds, ...]:
        return tuple(p for p in self.pools if p.role == role)

    def bounds(self, role: str) -> tuple[int, int]:
        mine = self.role(role)
        return sum(p.min_replicas for p in mine), sum(p.max_replicas for p in mine)

    def prefill_for(self, decode: int) -> int:
        """Prefill replicas for `decode` at the ratio (nearest, halves up), within bounds."""
        low, high = self.bounds("prefill")
        exact = decode * self.ratio_prefill / self.ratio_decode
        return min(high, max(low, math.floor(exact + 0.5)))

    def ratio_ok(self, prefill: int, decode: int) -> bool:
        """Within one replica of the target ratio (decode-only clusters: always)."""
        if not self.role("prefill"):
            return True
        return abs(prefill - decode * self.ratio_prefill / self.ratio_decode) <= 1.0


def check_policy(policy: Policy) -> None:
    """Refuse a policy whose bounds make the ratio impossible at some decode size (then the
    rules above would contradict each other), naming the field."""
    if policy.ratio_prefill < 1 or policy.ratio_decode < 1:
        raise PolicyError("spec.autoscaling.ratio", "both sides of the ratio must be at least 1")
    if not policy.target_inflight_per_decode > 0:
        raise PolicyError("spec.autoscaling.targetInflightPerDecode", "must be positive")
    for i, pool in enumerate(policy.pools):
        if not 0 <= pool.min_replicas <= pool.max_replicas:
            raise PolicyError(f"spec.autoscaling.pools[{i}]", f"{pool.name}: need 0 <= minReplicas <= maxReplicas")
    low, high = policy.bounds("decode")
    if high < 1:
        raise PolicyError("spec.autoscaling.pools", "decode pools may not all be capped at 0 replicas")
    for decode in range(max(low, 1), high + 1):
        if not policy.ratio_ok(policy.prefill_for(decode), decode):
            raise PolicyError("spec.autoscaling.pools",
                              f"prefill min/max cannot keep {policy.ratio_prefill}:{policy.ratio_decode} "
                              f"within one replica at {decode} decode replicas")


def policy_of(spec: ClusterSpec) -> Policy | None:
    """The cluster's policy (None without spec.autoscaling), pools in the spec's order."""
    auto = spec.autoscaling
    if auto is None:
        return None
    bounds = {b.name: b for b in auto.pools}
    return Policy(
        pools=tuple(PoolBounds(p.name, p.role, bounds[p.name].min_replicas, bounds[p.name].max_replicas)
                    for p in spec.pools),
        ratio_prefill=auto.ratio_prefill, ratio_decode=auto.ratio_decode,
        target_inflight_per_decode=auto.target_inflight_per_decode,
        scale_up_window_s=float(auto.scale_up_seconds), scale_down_window_s=float(auto.scale_down_seconds))


def policy_problems(spec: ClusterSpec) -> list[Problem]:
    """A policy that can never be met, as Valid=False on its field."""
    policy = policy_of(spec)
    if policy is None:
        return []
    try:
        check_policy(policy)
    except PolicyError as exc:
        return [Problem(exc.field, "ImpossibleAutoscaling", str(exc).partition(": ")[2])]
    return []


@dataclasses.dataclass(frozen=True)
class Recommendation:
    at: float        # seconds, any monotonic clock (the caller's)
    decode: int


@dataclasses.dataclass(frozen=True)
class Decision:
    replicas: dict[str, int]                 # pool name -> replicas
    prefill: int
    decode: int
    reason: str
    history: tuple[Recommendation, ...]      # to pass to the next call


def split(total: int, pools: Sequence[PoolBounds]) -> dict[str, int]:
    """`total` replicas over `pools` within each pool's bounds: every pool starts at its min, the
    rest goes one replica at a time to the pool with the fewest that still has room (ties: the
    first listed). `total` is clamped to what the bounds allow."""
    sizes = {p.name: p.min_replicas for p in pools}
    room = sum(p.max_replicas for p in pools)
    left = min(total, room) - sum(sizes.values())
    while left > 0:
        open_pools = [p for p in pools if sizes[p.name] < p.max_replicas]
        pick = min(open_pools, key=lambda p: sizes[p.name])
        sizes[pick.name] += 1
        left -= 1
    return sizes


def raw_decode(policy: Policy, inflight: float) -> int:
    """Decode replicas the signal asks for (at least 1 while anything is in flight), in bounds."""
    low, high = policy.bounds("decode")
    wanted = math.ceil(max(0.0, inflight) / policy.target_inflight_per_decode)
    return min(high, max(low, wanted, 1))


def stabilised(current: int, raw: int, history: Sequence[Recommendation], now: float, policy: Policy) -> int:
    """HPA-style: up to the lowest recommendation of the up-window, down to the highest of the
    down-window, never past `raw` and never beyond `current` in the wrong direction."""
    if raw > current:
        window = [r.decode for r in history if now - r.at < policy.scale_up_window_s] + [raw]
        return max(current, min(window))
    if raw < current:
        window = [r.decode for r in history if now - r.at < policy.scale_down_window_s] + [raw]
        return min(current, max(window))
    return current


def keeps_a_pair(ready: Mapping[str, Mapping[str, int]], remove_prefill: int, remove_decode: int,
                 pd: bool) -> bool:
    """Whether some revision keeps a Ready prefill and a Ready decode pod even if every removed
    pod is one of its Ready pods (worst case: the Deployment controller picks)."""
    for counts in ready.values():
        decode_left = counts.get("decode", 0) - remove_decode
        prefill_left = counts.get("prefill", 0) - remove_prefill
        if decode_left >= 1 and (prefill_left >= 1 or not pd):
            return True
    return False


def decide(policy: Policy, inflight: float, current: Mapping[str, int], ready: Mapping[str, Mapping[str, int]],
           history: Sequence[Recommendation], now: float) -> Decision:
    """The new size of every pool. `current`: pool -> replicas now (the UCMPools' spec.replicas);
    `ready`: revision -> role -> Ready pods; `history`: what earlier calls returned."""
    pd = bool(policy.role("prefill"))
    cur_decode = sum(current.get(p.name, 0) for p in policy.role("decode"))
    cur_prefill = sum(current.get(p.name, 0) for p in policy.role("prefill"))
    raw = raw_decode(policy, inflight)
    if not history:
        # No memory (a new policy, a restarted operator): the current size counts as recommended
        # now, so nothing shrinks before a whole down-window has seen the lower load.
        history = (Recommendation(now, cur_decode),)
    kept = tuple(r for r in history if now - r.at < max(policy.scale_up_window_s, policy.scale_down_window_s))
    decode = stabilised(cur_decode, raw, kept, now, policy)
    prefill = policy.prefill_for(decode) if pd else 0
    reason = f"{inflight:g} in flight / {policy.target_inflight_per_decode:g} per decode pod -> {raw} decode"
    if decode != raw:
        reason += f", stabilised to {decode}"
    remove_decode, remove_prefill = max(0, cur_decode - decode), max(0, cur_prefill - prefill)
    if (remove_decode or remove_prefill) and not keeps_a_pair(ready, remove_prefill, remove_decode, pd):
        # Hold the scale-in of both roles (the ratio of `current` stands); scale-out goes on.
        decode, prefill = max(decode, cur_decode), max(prefill, cur_prefill)
        reason += "; scale-in held: it could remove the last Ready same-revision prefill+decode pair"
    replicas = {**split(decode, policy.role("decode")), **(split(prefill, policy.role("prefill")) if pd else {})}
    return Decision(replicas=replicas, prefill=prefill, decode=decode, reason=reason,
                    history=(*kept, Recommendation(now, raw)))


def parse_router_inflight(texts: Sequence[str]) -> float:
    """The sum of `ucm_router_inflight_requests` over the routers' /metrics texts (Prometheus text
    format, no Prometheus server needed). A text without the metric is an error: a router that
    does not report load must not read as idle and scale everything in."""
    total = 0.0
    for i, text in enumerate(texts):
        values = [m.group("value") for line in text.splitlines()
                  if (m := _SAMPLE.match(line.strip())) and m.group("name") == INFLIGHT_METRIC]
        if not values:
            raise ValueError(f"router #{i}: no {INFLIGHT_METRIC} sample in its /metrics")
        total += sum(float(v) for v in values)
    return total
