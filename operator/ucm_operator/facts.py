"""Can the cluster's nodes run each pool at all? A pool asking for more GPUs per pod than any node
it may be scheduled on has is a spec that can never run: its pods would stay Pending forever, so
it is refused up front (Valid=False on `gpu.count`) instead of being created.

"May be scheduled on" is what the scheduler would check statically: the pod's nodeSelector (the
pool's own plus `gpu.product`), the required node affinity terms, and the NoSchedule/NoExecute
taints its tolerations (the pool's plus the operator's GPU toleration) do not cover. When the
selector reaches no node at all, nothing is refused: nodes may be added later (an autoscaler's
node group scaled to zero), and the pods' Unschedulable state is reported as Degraded.

Nodes are read (never written) on every pass, and the operator re-checks every cluster when a
node's GPU facts change (runtime.py's node watch), so adding a larger node turns the cluster
Valid without anyone touching it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .build_workers import pod_tolerations
from .compat import Problem
from .constants import GPU_PRODUCT_LABEL, GPU_RESOURCE
from .spec import ClusterSpec, PoolSpec

JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What scheduling a GPU pool depends on: name, labels, taints and allocatable GPUs."""

    name: str
    labels: tuple[tuple[str, str], ...]
    taints: tuple[tuple[str, str, str], ...]   # (key, value, effect)
    gpus: int

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> NodeFacts:
        meta = node.get("metadata") or {}
        status = node.get("status") or {}
        amount = ((status.get("allocatable") or {}).get(GPU_RESOURCE)
                  or (status.get("capacity") or {}).get(GPU_RESOURCE) or "0")
        try:
            gpus = int(str(amount))
        except ValueError:
            gpus = 0
        taints = tuple(sorted((str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
                              for t in (node.get("spec") or {}).get("taints") or []))
        return cls(str(meta.get("name", "")), tuple(sorted((meta.get("labels") or {}).items())), taints, gpus)


def _expression_matches(expr: Mapping[str, Any], value: str | None) -> bool:
    operator = expr.get("operator")
    values = [str(v) for v in expr.get("values") or []]
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and len(values) == 1:
        try:
            left, right = int(value), int(values[0])
        except ValueError:
            return False
        return left > right if operator == "Gt" else left < right
    return False


def _term_matches(term: Mapping[str, Any], node: NodeFacts) -> bool:
    labels = dict(node.labels)
    return (all(_expression_matches(e, labels.get(str(e.get("key")))) for e in term.get("matchExpressions") or [])
            and all(_expression_matches(e, node.name if e.get("key") == "metadata.name" else None)
                    for e in term.get("matchFields") or []))


def _tolerated(taint: tuple[str, str, str], tolerations: Iterable[Any]) -> bool:
    key, value, effect = taint
    for tol in tolerations:
        if not isinstance(tol, dict):
            continue
        if tol.get("effect") and tol.get("effect") != effect:
            continue
        if tol.get("operator", "Equal") == "Exists":
            if not tol.get("key") or tol.get("key") == key:
                return True
        elif tol.get("key") == key and str(tol.get("value", "")) == value:
            return True
    return False


def required_terms(pool: PoolSpec) -> list[Mapping[str, Any]] | None:
    """The required node affinity terms ([] when there are none), or None when the affinity is
    malformed — the dry run of the Deployment names that mistake, and this check stays out."""
    node_affinity = (pool.affinity or {}).get("nodeAffinity") or {}
    if not isinstance(node_affinity, dict):
        return None
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return []
    terms = required.get("nodeSelectorTerms") if isinstance(required, dict) else None
    if not isinstance(terms, list):
        return None
    for term in terms:
        if not isinstance(term, dict):
            return None
        for key in ("matchExpressions", "matchFields"):
            expressions = term.get(key) or []
            if not isinstance(expressions, list) or not all(isinstance(e, dict) for e in expressions):
                return None
    return terms


def reaches(pool: PoolSpec, node: NodeFacts, terms: Sequence[Mapping[str, Any]] = ()) -> bool:
    """Could the scheduler place one of the pool's pods on `node`, GPUs aside? `terms`: the
    pool's required node affinity terms (`required_terms`)."""
    labels = dict(node.labels)
    selector = dict(pool.node_selector)
    if pool.gpu_product:
        selector[GPU_PRODUCT_LABEL] = pool.gpu_product
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    if terms and not any(_term_matches(t, node) for t in terms):
        return False
    tolerations = pod_tolerations(pool)
    return all(_tolerated(t, tolerations) for t in node.taints if t[2] in ("NoSchedule", "NoExecute"))


def node_problems(spec: ClusterSpec, nodes: Sequence[NodeFacts] | None) -> list[Problem]:
    """Pools whose GPUs per pod exceed those of every node they can reach (None: nodes unknown)."""
    if not nodes:
        return []
    problems = []
    for pool in spec.pools:
        terms = required_terms(pool)
        if terms is None:
            continue
        reachable = [n for n in nodes if reaches(pool, n, terms)]
        if not reachable:
            continue
        most = max(n.gpus for n in reachable)
        if pool.gpu_count > most:
            names = ", ".join(sorted(n.name for n in reachable if n.gpus == most)[:5])
            problems.append(Problem(
                f"{pool.field}.gpu.count", "NotEnoughGPUsOnNodes",
                f"{pool.gpu_count} GPUs per pod, but the {len(reachable)} nodes this pool's nodeSelector, gpu.product, "
                f"affinity and tolerations reach have at most {most} allocatable {GPU_RESOURCE} ({names})"))
    return problems
