"""What `make demo` prints: pure functions from API objects (plain JSON dicts) to text.

Kept apart from the orchestration so the wording and the "is it Serving" decision can be tested
without a cluster, and so the progress display reads exactly the fields a user would read with
kubectl (the UCMCluster's status, pod labels, node labels) rather than anything demo-private.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JSON = Mapping[str, Any]

LABEL_CLUSTER = "ucm.dev/cluster"
LABEL_ROLE = "ucm.dev/role"
LABEL_POOL = "ucm.dev/pool"
LABEL_REVISION = "ucm.dev/revision"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
CONDITION_ORDER = ("Valid", "StoreReady", "PrefillReady", "DecodeReady", "RouterReady", "Serving",
                   "Progressing", "Degraded")


@dataclass(frozen=True)
class PodView:
    name: str
    role: str
    pool: str
    revision: str
    phase: str
    ready: bool
    node: str
    gpu_product: str
    waiting: str  # why it is not running yet (scheduler message), empty otherwise


@dataclass(frozen=True)
class Snapshot:
    """One look at a UCMCluster and the pods it owns."""

    name: str
    namespace: str
    revision: str
    conditions: dict[str, tuple[str, str]]  # type -> (status, reason)
    pools: list[dict[str, Any]]
    router_url: str
    pods: list[PodView] = field(default_factory=list)
    generation: int = 0
    observed_generation: int = 0


def condition_status(cr: JSON, kind: str) -> str:
    for cond in cr.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == kind:
            return str(cond.get("status", "Unknown"))
    return "Unknown"


def is_serving(cr: JSON) -> bool:
    """Serving=True for the spec the operator last saw (a stale True from an old generation is not enough)."""
    status = cr.get("status", {}) or {}
    fresh = status.get("observedGeneration", 0) >= cr.get("metadata", {}).get("generation", 0)
    return fresh and condition_status(cr, "Serving") == "True"


def _pod_ready(pod: JSON) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []) or [])


def _waiting_reason(pod: JSON) -> str:
    for cond in pod.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("message") or cond.get("reason") or "unschedulable")
    return ""


def build_snapshot(cr: JSON, pods: Sequence[JSON], nodes: Sequence[JSON]) -> Snapshot:
    """Joins the UCMCluster, its pods (label ucm.dev/cluster) and the nodes they run on."""
    products = {n["metadata"]["name"]: n["metadata"].get("labels", {}).get(GPU_PRODUCT_LABEL, "-") for n in nodes}
    status = cr.get("status", {}) or {}
    views = []
    for pod in pods:
        labels = pod["metadata"].get("labels", {}) or {}
        node = pod.get("spec", {}).get("nodeName") or ""
        views.append(PodView(
            name=pod["metadata"]["name"],
            role=labels.get(LABEL_ROLE, "?"),
            pool=labels.get(LABEL_POOL, "-"),
            revision=labels.get(LABEL_REVISION, ""),
            phase=pod.get("status", {}).get("phase", "Pending") if not pod["metadata"].get("deletionTimestamp")
            else "Terminating",
            ready=_pod_ready(pod),
            node=node,
            gpu_product=products.get(node, "-") if node else "-",
            waiting=_waiting_reason(pod),
        ))
    role_order = {"prefill": 0, "decode": 1, "router": 2}
    views.sort(key=lambda p: (role_order.get(p.role, 9), p.pool, p.name))
    return Snapshot(
        name=cr["metadata"]["name"],
        namespace=cr["metadata"].get("namespace", ""),
        revision=str(status.get("revision", "")),
        conditions={str(c["type"]): (str(c.get("status", "Unknown")), str(c.get("reason", "")))
                    for c in status.get("conditions", []) or []},
        pools=list(status.get("pools", []) or []),
        router_url=str(status.get("routerURL", "")),
        pods=views,
        generation=int(cr["metadata"].get("generation", 0)),
        observed_generation=int(status.get("observedGeneration", 0)),
    )


def _conditions_line(snap: Snapshot) -> str:
    known = [k for k in CONDITION_ORDER if k in snap.conditions] + sorted(set(snap.conditions) - set(CONDITION_ORDER))
    parts = []
    for kind in known:
        state, reason = snap.conditions[kind]
        mark = {"True": "+", "False": "-"}.get(state, "?")
        parts.append(f"{mark}{kind}" + (f"({reason})" if reason and state != "True" else ""))
    return " ".join(parts) or "(no status yet: is the operator running?)"


def render_progress(snap: Snapshot) -> str:
    """A compact block: conditions, per-pool counts, and every pod with its node and GPU product."""
    serving = snap.conditions.get("Serving", ("Unknown", ""))[0]
    lines = [f"UCMCluster {snap.namespace}/{snap.name}  Serving={serving}  revision={snap.revision or '-'}"
             f"  generation={snap.generation} observed={snap.observed_generation}",
             f"  conditions: {_conditions_line(snap)}"]
    for pool in snap.pools:
        lines.append(f"  pool {pool.get('role', '?')}/{pool.get('name', '?')}: ready {pool.get('ready', 0)}"
                     f"/{pool.get('desired', 0)} (updated {pool.get('updated', 0)})")
    for pod in snap.pods:
        where = f"on {pod.node} ({pod.gpu_product})" if pod.node else f"unscheduled: {pod.waiting or 'waiting'}"
        lines.append(f"    {pod.role:<8} {pod.name:<44} {pod.phase:<11} {'Ready' if pod.ready else 'NotReady':<8} "
                     f"{where}")
    return "\n".join(lines)


def render_topology(snap: Snapshot, spec: JSON) -> str:
    """Which pool runs on which GPU product and node, with the TP size the spec asked for."""
    tp = {(role, p["name"]): p.get("tensorParallelSize", 1)
          for role in ("prefill", "decode") for p in spec.get(role, []) or []}
    asked = {(role, p["name"]): (p.get("gpu", {}) or {}).get("product", "-")
             for role in ("prefill", "decode") for p in spec.get(role, []) or []}
    header = f"{'ROLE':<8} {'POOL':<10} {'TP':>2}  {'GPU PRODUCT (node label)':<26} {'NODE':<22} POD"
    lines = [f"Topology of {snap.namespace}/{snap.name} (revision {snap.revision}):", "  " + header]
    for pod in snap.pods:
        key = (pod.role, pod.pool)
        mismatch = ""
        if key in asked and asked[key] not in ("-", pod.gpu_product):
            mismatch = f"  <-- asked for {asked[key]}"
        lines.append(f"  {pod.role:<8} {pod.pool:<10} {tp.get(key, '-')!s:>2}  {pod.gpu_product:<26} "
                     f"{pod.node or '-':<22} {pod.name}{mismatch}")
    store = spec.get("store", {}) or {}
    if "nfs" in store:
        where = f"NFS {store['nfs'].get('server')}:{store['nfs'].get('path')}"
    elif "pvc" in store:
        where = f"PVC {snap.name}-store ({store['pvc'].get('accessMode', 'ReadWriteMany')})"
    else:
        where = f"PVC {store.get('existingClaim', '?')} (existing)"
    lines.append(f"  store: {where}, mounted at {store.get('mountPath', '/mnt/ucm')} in every prefill and decode pod")
    if snap.router_url:
        lines.append(f"  router: {snap.router_url}")
    return "\n".join(lines)


def render_explore(kubectl: str, kubeconfig: str, namespace: str, name: str, release: str) -> str:
    """The commands a user can paste into another terminal while the demo keeps running."""
    commands = [
        (f"export KUBECONFIG={kubeconfig}", ""),
        (f"export PATH={kubectl.rsplit('/', 1)[0]}:$PATH", "kubectl and helm built for this repo"),
        (f"kubectl -n {namespace} get ucmclusters", "SERVING, PREFILL, DECODE, REVISION"),
        (f"kubectl -n {namespace} describe ucmcluster {name}", "conditions with reasons, events"),
        (f"kubectl -n {namespace} get pods -o wide -L {LABEL_ROLE},{LABEL_POOL},{LABEL_REVISION}", ""),
        (f"kubectl get nodes -L {GPU_PRODUCT_LABEL}", "GPU product of each node"),
        (f"kubectl -n {namespace} get deploy,svc,cm,pdb -l {LABEL_CLUSTER}={name}", "what the operator created"),
        (f"kubectl -n {namespace} patch ucmc {name} --type=merge -p "
         "'{\"spec\":{\"router\":{\"replicas\":2}}}'", "scale the router; watch it reconcile"),
        (f"helm -n {namespace} status {release}", ""),
    ]
    width = max(len(c) for c, note in commands if note and len(c) < 70)
    lines = ["Explore it from another terminal:"]
    for command, note in commands:
        lines.append(f"  {command:<{width}}   # {note}" if note else f"  {command}")
    return "\n".join(lines)
