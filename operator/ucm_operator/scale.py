"""One `UCMPool` per worker pool: the object `kubectl scale`, a HorizontalPodAutoscaler or KEDA
scale through its Scale subresource (a CRD has one /scale per kind, so per-pool scaling needs a
child object per pool), and whose `spec.replicas` the pool's Deployment follows.

Who wins between the UCMCluster's `spec.<role>[i].replicas` and /scale (docs/scaling.md):

- The UCMPool's `spec.replicas` is authoritative for the pool's size. The operator never writes it
  back on a resync or a restart, so an autoscaler's choice stays.
- The UCMCluster's value is the pool's *base*: written into the UCMPool when the pool is created,
  and again whenever the UCMCluster's value is edited (a re-base: the latest deliberate change
  wins, like `kubectl scale` after an `apply`). The UCMPool keeps the base it was last given in
  `spec.clusterReplicas`, so "was it edited?" is answered by the two objects, not by memory in
  the operator, and survives restarts.

Field ownership says the same thing: the operator's server-side apply of a UCMPool (manager
`ucm-operator`) never contains `spec.replicas` or `spec.clusterReplicas`, so its manifest (and
hash) is a pure function of the UCMCluster and a /scale write never makes it re-apply anything.
A re-base is a second, partial apply under its own manager (`REBASE_MANAGER`) that sets both
fields in one request: a crash between the UCMPool's creation and its re-base leaves
`clusterReplicas` unset, which the next pass re-bases again. /scale writers (HPA, kubectl) take
ownership of `spec.replicas` from it; the next re-base takes it back (force).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .constants import API_VERSION, LABEL_POOL, LABEL_ROLE, POOL_KIND
from .meta import JSON, object_meta, pool_name, selector_labels, short_hash
from .spec import ClusterSpec, PoolSpec

# Field manager of re-base applies (spec.replicas and spec.clusterReplicas only).
REBASE_MANAGER = "ucm-operator-rebase"
# Field manager of the operator's own autoscaler (spec.autoscaling), which writes /scale like an HPA.
AUTOSCALER_MANAGER = "ucm-operator-autoscaler"
# Fields of the UCMPool's spec that are not the operator's main apply: ignored by drift detection.
SCALE_FIELDS = ("replicas", "clusterReplicas")


@dataclasses.dataclass(frozen=True)
class PoolReplicas:
    """The size of one pool in this pass: `replicas` (what its Deployment gets) and whether the
    UCMPool must be re-based to the UCMCluster's value first."""

    pool: str
    replicas: int
    rebase: bool


def selector(spec: ClusterSpec, pool: PoolSpec) -> str:
    """The pool's pods as a label selector string: what an HPA reads from /scale to count them."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(spec, pool.role, pool.name).items()))


def build_pool_scaler(spec: ClusterSpec, pool: PoolSpec) -> JSON:
    """The UCMPool of `pool`, as the operator's main apply writes it: identity and selector, never
    the replica count (see the module docstring for why)."""
    return {
        "apiVersion": API_VERSION,
        "kind": POOL_KIND,
        "metadata": object_meta(spec, pool_name(spec, pool.name), pool.role, pool.name),
        "spec": {"cluster": spec.name, "role": pool.role, "pool": pool.name},
    }


def build_rebase(spec: ClusterSpec, pool: PoolSpec) -> JSON:
    """The partial apply that re-bases a UCMPool to the UCMCluster's replicas (REBASE_MANAGER)."""
    return {
        "apiVersion": API_VERSION,
        "kind": POOL_KIND,
        "metadata": {"name": pool_name(spec, pool.name), "namespace": spec.namespace},
        "spec": {"replicas": pool.replicas, "clusterReplicas": pool.replicas},
    }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plan_replicas(spec: ClusterSpec, live: Mapping[str, Mapping[str, Any]]) -> dict[str, PoolReplicas]:
    """Per pool name: the replicas its Deployment gets in this pass. `live`: the UCMPools that
    exist, by pool name. New pools, pools whose UCMCluster value differs from the UCMPool's
    `clusterReplicas` (an edit), and UCMPools a crash left without a size are re-based to the
    UCMCluster's value; every other pool keeps the UCMPool's `spec.replicas` (/scale's choice)."""
    plan: dict[str, PoolReplicas] = {}
    for pool in spec.pools:
        current = (live.get(pool.name) or {}).get("spec") or {}
        replicas, base = _int(current.get("replicas")), _int(current.get("clusterReplicas"))
        if replicas is None or base != pool.replicas:
            plan[pool.name] = PoolReplicas(pool.name, pool.replicas, rebase=True)
        else:
            plan[pool.name] = PoolReplicas(pool.name, replicas, rebase=False)
    return plan


def with_replicas(spec: ClusterSpec, plan: Mapping[str, PoolReplicas]) -> ClusterSpec:
    """`spec` with each pool's replicas as planned: what the Deployments, PDBs and status use."""
    def sized(pool: PoolSpec) -> PoolSpec:
        planned = plan.get(pool.name)
        return pool if planned is None else dataclasses.replace(pool, replicas=planned.replicas)
    return dataclasses.replace(spec, prefill=tuple(map(sized, spec.prefill)), decode=tuple(map(sized, spec.decode)))


def scaler_version(obj: Mapping[str, Any]) -> str:
    """What changes when someone other than a scaler edits a UCMPool: its labels, annotations,
    owners and spec without the replica fields. (Its generation would move on every /scale write,
    and re-applying the main manifest then would be a write that changes nothing.)"""
    meta = obj.get("metadata") or {}
    spec = {k: v for k, v in (obj.get("spec") or {}).items() if k not in SCALE_FIELDS}
    return "s" + short_hash({"labels": meta.get("labels"), "annotations": meta.get("annotations"),
                             "owners": meta.get("ownerReferences"), "spec": spec})


def pool_status(spec: ClusterSpec, pool: PoolSpec, scaler: Mapping[str, Any],
                deployment: Mapping[str, Any] | None) -> JSON:
    """A UCMPool's status, computed from its Deployment: `replicas` (pods that exist, for
    /scale's status), `readyReplicas` and `updatedReplicas` (for `kubectl get`), `selector` (for
    an HPA) and `observedGeneration`: the UCMPool generation whose size the Deployment has been
    given. Never accumulated, so it is true after a restart."""
    dstatus = (deployment or {}).get("status") or {}
    dspec = (deployment or {}).get("spec") or {}
    meta = scaler.get("metadata") or {}
    sized = deployment is not None and dspec.get("replicas") == pool.replicas
    status: JSON = {
        "replicas": int(dstatus.get("replicas") or 0),
        "readyReplicas": int(dstatus.get("readyReplicas") or 0),
        "updatedReplicas": int(dstatus.get("updatedReplicas") or 0),
        "selector": selector(spec, pool),
    }
    previous = _int((scaler.get("status") or {}).get("observedGeneration"))
    generation = _int(meta.get("generation"))
    observed = generation if sized else previous
    if observed is not None:
        status["observedGeneration"] = observed
    return status


def scalers_by_pool(objects: Mapping[tuple[str, str, str], JSON]) -> dict[str, JSON]:
    """The live UCMPools among a cluster's children, by pool name (their pool label)."""
    found: dict[str, JSON] = {}
    for (_api, kind, _name), obj in objects.items():
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if kind == POOL_KIND and labels.get(LABEL_POOL) and labels.get(LABEL_ROLE):
            found[str(labels[LABEL_POOL])] = obj
    return found
