"""The UCMCluster status, computed from the live children every time (never accumulated), so it
tells the truth after a restart, a manual edit or a node failure.

`Serving` is the promise users care about: at least one prefill and one decode pod of the SAME
revision are Ready (the router only pairs within a revision, so two Ready pods of different
revisions cannot serve a request), the store is bound and the router is Ready.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .compat import Problem
from .constants import LABEL_POOL, LABEL_REVISION, LABEL_ROLE, ROLE_DECODE, ROLE_PREFILL, ROLE_ROUTER
from .meta import router_url
from .spec import ClusterSpec

JSON = dict[str, Any]
CONDITION_TYPES = ("Valid", "StoreReady", "StoreHealthy", "PrefillReady", "DecodeReady", "RouterReady", "Serving",
                   "Progressing", "Degraded")


@dataclasses.dataclass
class Observed:
    """What the reconciler saw and did in one pass: the inputs of `compute_status`."""

    spec: ClusterSpec
    generation: int
    revision: str                      # revision of the spec being reconciled
    problems: Sequence[Problem] = ()   # compat problems: Valid=False and nothing applied
    deployments: Sequence[JSON] = ()   # live Deployments of this cluster
    pods: Sequence[JSON] = ()          # live Pods of this cluster
    claim: JSON | None = None          # live store PVC (pvc/existingClaim), if any
    applied: int = 0                   # children written in this pass
    errors: Sequence[str] = ()         # apply/prune failures in this pass
    autoscaling: JSON | None = None    # what the autoscaler saw and did (spec.autoscaling only)
    store_usage: JSON | None = None    # status.store from the workers' /metrics (store_usage.py)
    store_health: JSON | None = None   # the StoreHealthy condition from the same reading


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def pod_ready(pod: Mapping[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _unschedulable(pod: Mapping[str, Any]) -> str | None:
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message") or "unschedulable")
    return None


@dataclasses.dataclass
class PoolState:
    name: str
    role: str
    desired: int
    ready: int = 0
    updated: int = 0
    complete: bool = False
    stuck: str | None = None

    def summary(self) -> str:
        return f"{self.name}: {self.ready}/{self.desired} ready, {self.updated}/{self.desired} updated"


def _deployment_state(name: str, role: str, desired: int, deployment: Mapping[str, Any] | None,
                      revision: str | None) -> PoolState:
    state = PoolState(name, role, desired)
    if deployment is None:
        return state
    status = deployment.get("status") or {}
    meta = deployment.get("metadata") or {}
    observed = int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    current = revision is None or _labels(deployment).get(LABEL_REVISION) == revision
    state.ready = int(status.get("readyReplicas") or 0)
    state.updated = int(status.get("updatedReplicas") or 0) if observed and current else 0
    state.complete = (observed and current and deployment.get("spec", {}).get("replicas") == desired
                      and state.updated >= desired and state.ready >= desired
                      and int(status.get("replicas") or 0) <= desired)
    for c in status.get("conditions") or []:
        if c.get("type") == "Progressing" and c.get("status") == "False":
            state.stuck = f"{name}: {c.get('reason')}: {c.get('message')}"
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            state.stuck = f"{name}: {c.get('reason')}: {c.get('message')}"
    return state


def pool_states(obs: Observed) -> list[PoolState]:
    """One entry per pool: from the spec when it is valid (a pool not created yet shows 0 ready),
    from the live Deployments when it is not (the spec's pools do not run; the old ones do)."""
    by_pool = {(_labels(d).get(LABEL_ROLE), _labels(d).get(LABEL_POOL)): d for d in obs.deployments}
    if not obs.problems:
        return [_deployment_state(p.name, p.role, p.replicas, by_pool.get((p.role, p.name)), obs.revision)
                for p in obs.spec.pools]
    return [_deployment_state(str(pool), str(role), int(d.get("spec", {}).get("replicas") or 0), d, None)
            for (role, pool), d in sorted(by_pool.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))
            if role in (ROLE_PREFILL, ROLE_DECODE)]


def _condition(type_: str, ok: bool, reason: str, message: str) -> JSON:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


def _store_condition(obs: Observed) -> JSON:
    store = obs.spec.store
    if store.kind == "nfs":
        return _condition("StoreReady", True, "NFS", f"nfs {store.nfs_server}:{store.nfs_path} is mounted directly")
    claim = obs.claim
    if claim is None:
        return _condition("StoreReady", False, "ClaimNotFound", "the store's PersistentVolumeClaim does not exist yet")
    phase = (claim.get("status") or {}).get("phase", "Pending")
    name = claim["metadata"]["name"]
    if phase == "Bound":
        return _condition("StoreReady", True, "Bound", f"claim {name} is Bound")
    return _condition("StoreReady", False, "ClaimNotBound", f"claim {name} is {phase}")


def _role_condition(type_: str, role: str, pools: Sequence[PoolState], required: bool) -> JSON:
    mine = [p for p in pools if p.role == role]
    if not mine:
        ok = not required
        return _condition(type_, ok, "NoPools", f"no {role} pools")
    waiting = [p for p in mine if not p.complete]
    if not waiting:
        return _condition(type_, True, "PoolsReady", "; ".join(p.summary() for p in mine))
    return _condition(type_, False, "PoolsNotReady", "; ".join(p.summary() for p in waiting))


def ready_by_revision(pods: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for pod in pods:
        if pod_ready(pod):
            labels = _labels(pod)
            counts[labels.get(LABEL_REVISION, "")][labels.get(LABEL_ROLE, "")] += 1
    return counts


def _serving_condition(obs: Observed, store: JSON, router_ready: bool) -> JSON:
    counts = ready_by_revision(obs.pods)
    pd = obs.spec.disaggregated
    pairs = [(rev, c) for rev, c in counts.items()
             if c.get(ROLE_DECODE, 0) > 0 and (c.get(ROLE_PREFILL, 0) > 0 or not pd)]
    # Prefer the current revision when several serve (mid-rollout).
    pairs.sort(key=lambda rc: rc[0] != obs.revision)
    if not pairs:
        what = "a prefill and a decode pod of the same revision are" if pd else "a decode pod is"
        return _condition("Serving", False, "NoReadyPair", f"no revision where {what} Ready")
    if store["status"] != "True":
        return _condition("Serving", False, "StoreNotReady", store["message"])
    if not router_ready:
        return _condition("Serving", False, "RouterNotReady", "no router pod is Ready")
    rev, c = pairs[0]
    return _condition("Serving", True, "Serving",
                      f"revision {rev}: {c.get(ROLE_PREFILL, 0)} prefill + {c.get(ROLE_DECODE, 0)} decode pods Ready")


def compute_status(obs: Observed, previous: Mapping[str, Any] | None) -> JSON:
    """The full status object for `obs`. Conditions keep their lastTransitionTime while their
    status is unchanged, so computing it twice from the same world gives an identical object and
    the reconciler's equality check sends no status patch."""
    previous = previous or {}
    pools = pool_states(obs)
    router = next((d for d in obs.deployments if _labels(d).get(LABEL_ROLE) == ROLE_ROUTER), None)
    router_state = _deployment_state("router", ROLE_ROUTER, obs.spec.router.replicas, router, None)
    store = _store_condition(obs)
    router_cond = _condition("RouterReady", router_state.ready > 0,
                             "Ready" if router_state.ready > 0 else "NotReady",
                             f"{router_state.ready}/{obs.spec.router.replicas} router pods ready")
    problems = list(obs.problems)
    valid = (_condition("Valid", True, "Valid", "spec is valid") if not problems else
             _condition("Valid", False, problems[0].reason, "; ".join(str(p) for p in problems)))
    unschedulable = sorted({f"{_labels(p).get(LABEL_POOL)}: {m}" for p in obs.pods if (m := _unschedulable(p))})
    stuck = [s.stuck for s in [*pools, router_state] if s.stuck]
    if problems:
        degraded = _condition("Degraded", True, "InvalidSpec", "the spec is not valid; what runs was left unchanged")
    elif obs.errors:
        degraded = _condition("Degraded", True, "ApplyFailed", "; ".join(obs.errors))
    elif unschedulable:
        degraded = _condition("Degraded", True, "Unschedulable", "; ".join(unschedulable))
    elif stuck:
        degraded = _condition("Degraded", True, "RolloutStuck", "; ".join(stuck))
    else:
        degraded = _condition("Degraded", False, "AsExpected", "no problems")
    rolling = [p for p in [*pools, router_state] if not p.complete]
    if obs.applied:
        progressing = _condition("Progressing", True, "Applied", f"applied {obs.applied} changed objects")
    elif rolling:
        progressing = _condition("Progressing", True, "RollingOut", "; ".join(p.summary() for p in rolling))
    else:
        progressing = _condition("Progressing", False, "Stable", "every pool and the router are rolled out")
    # StoreHealthy (read-only, unreachable) informs; it does not gate Serving: a store that
    # refuses writes still serves (saves are dropped, loads work), and a worker that cannot reach
    # it recomputes.
    health = [dict(obs.store_health)] if obs.store_health else []
    conditions = [
        valid, store, *health,
        _role_condition("PrefillReady", ROLE_PREFILL, pools, required=obs.spec.disaggregated),
        _role_condition("DecodeReady", ROLE_DECODE, pools, required=True),
        router_cond,
        _serving_condition(obs, store, router_state.ready > 0),
        progressing, degraded,
    ]
    old = {c.get("type"): c for c in previous.get("conditions") or []}
    for cond in conditions:
        before = old.get(cond["type"])
        cond["lastTransitionTime"] = (before.get("lastTransitionTime") if before and before.get("status") ==
                                      cond["status"] and before.get("lastTransitionTime") else now())
        cond["observedGeneration"] = obs.generation

    def total(role: str) -> str:
        mine = [p for p in pools if p.role == role]
        return f"{sum(p.ready for p in mine)}/{sum(p.desired for p in mine)}"

    status: JSON = {
        "observedGeneration": obs.generation,
        # While the spec is invalid, the revision that runs is the previous one.
        "revision": previous.get("revision", "") if problems else obs.revision,
        "prefill": total(ROLE_PREFILL),
        "decode": total(ROLE_DECODE),
        "routerURL": router_url(obs.spec),
        "pools": [{"name": p.name, "role": p.role, "desired": p.desired, "ready": p.ready, "updated": p.updated}
                  for p in pools],
        "conditions": conditions,
    }
    if obs.autoscaling is not None:
        status["autoscaling"] = obs.autoscaling
    if obs.store_usage:
        status["store"] = obs.store_usage
    return status
