"""`ucm-operator bench`: how long N UCMClusters take to reach Serving, and how many writes the
operator sends on a no-op resync, against the cluster in the current kubeconfig (e.g. one from
`make cluster-up`: kwok marks pods Ready, so the time is the control plane's plus the operator's).

Same-run baselines:
- time: the same child objects applied directly (what `ucm-operator render` prints), with no
  operator, until every pod is Ready — the control plane's own share of the time;
- writes: the API server's apiserver_request_total for write verbs on the resources the operator
  touches, over a window of the same length without a resync (what the rest of the control plane
  writes meanwhile), next to the window with a resync; plus the operator's own write counter.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import uuid
from collections import Counter
from typing import Any

from .build import build_children
from .constants import API_VERSION, GPU_PRODUCT_LABEL, GPU_RESOURCE, KIND
from .kube import Kube, KubeError, load_api_client
from .runtime import Operator, Options
from .spec import parse_cluster

JSON = dict[str, Any]
WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE")
OPERATOR_RESOURCES = ("deployments", "services", "configmaps", "persistentvolumeclaims", "serviceaccounts",
                      "poddisruptionbudgets", "roles", "rolebindings", "ucmclusters", "ucmpools", "events")
_METRIC = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.e+]+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def bench_cluster(name: str, namespace: str) -> JSON:
    """One small PD cluster: a TP 1 prefill pool on H100 and a TP 1 decode pool on L40S, NFS store."""
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"servedName": "bench", "source": "hf://org/bench-model"},
            "store": {"nfs": {"server": "nfs.invalid", "path": "/ucm"}},
            "prefill": [{"name": "p", "gpu": {"product": "NVIDIA-H100-80GB-HBM3"},
                         "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
            "decode": [{"name": "d", "gpu": {"product": "NVIDIA-L40S"},
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
            "router": {"resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}},
        },
    }


BENCH_NODE_LABEL = "ucm.dev/bench-node"
GPUS_PER_BENCH_NODE = 64


def bench_nodes(clusters: int) -> list[JSON]:
    """Simulated (kwok) GPU nodes with room for the benchmark's pods: the default e2e nodes hold
    a handful of GPUs, 50 clusters need 50 of each product."""
    count = max(1, -(-clusters // GPUS_PER_BENCH_NODE))
    nodes = []
    for product, short in (("NVIDIA-H100-80GB-HBM3", "h100"), ("NVIDIA-L40S", "l40s")):
        for i in range(count):
            name = f"ucm-bench-{short}-{i}"
            resources = {"cpu": "512", "memory": "4Ti", "pods": "500", GPU_RESOURCE: str(GPUS_PER_BENCH_NODE)}
            nodes.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                             "labels": {"kubernetes.io/hostname": name, "type": "kwok", BENCH_NODE_LABEL: "true",
                                        GPU_PRODUCT_LABEL: product}},
                "spec": {"taints": [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]},
                "status": {"capacity": resources, "allocatable": resources},
            })
    # The routers go anywhere without a taint; give them room too.
    name = "ucm-bench-cpu-0"
    resources = {"cpu": "512", "memory": "4Ti", "pods": "500"}
    nodes.append({"apiVersion": "v1", "kind": "Node",
                  "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                               "labels": {"kubernetes.io/hostname": name, "type": "kwok", BENCH_NODE_LABEL: "true"}},
                  "spec": {}, "status": {"capacity": resources, "allocatable": resources}})
    return nodes


def _node_ready(node: JSON) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node.get("status") or {}).get("conditions") or [])


def add_bench_nodes(kube: Kube, clusters: int, timeout: float) -> list[str]:
    names = []
    for node in bench_nodes(clusters):
        names.append(node["metadata"]["name"])
        if kube.request("GET", "/api/v1/nodes", query=[("fieldSelector", f"metadata.name={names[-1]}")])["items"]:
            continue
        kube.request("POST", "/api/v1/nodes", body=node)
    _wait(lambda: sum(_node_ready(n) for n in kube.request(
        "GET", "/api/v1/nodes", query=[("labelSelector", f"{BENCH_NODE_LABEL}=true")])["items"]),
        len(names), timeout, "benchmark nodes Ready (is kwok running?)")
    return names


def remove_bench_nodes(kube: Kube, names: list[str]) -> None:
    for name in names:
        try:
            kube.request("DELETE", f"/api/v1/nodes/{name}")
        except KubeError:
            pass


def write_counts(kube: Kube) -> Counter[str]:
    """apiserver_request_total summed per "VERB resource" for write verbs."""
    text = kube.api.call_api(*kube.api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"]))
    counts: Counter[str] = Counter()
    for line in text.read().decode().splitlines():  # type: ignore[no-untyped-call]
        match = _METRIC.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group("labels")))
        if labels.get("verb") in WRITE_VERBS:
            resource = labels.get("resource", "") + ("/" + labels["subresource"] if labels.get("subresource") else "")
            counts[f"{labels['verb']} {resource}"] += int(float(match.group("value")))
    return counts


def operator_writes(delta: Counter[str]) -> int:
    """Writes on resources the operator writes (their status subresources excepted, which the
    controllers own; the UCMCluster's and UCMPools' status are the operator's; /scale is not)."""
    total = 0
    for key, value in delta.items():
        resource = key.split(" ", 1)[1]
        base, _, sub = resource.partition("/")
        if base in OPERATOR_RESOURCES and (not sub or (base in ("ucmclusters", "ucmpools") and sub == "status")):
            total += value
    return total


def _serving(kube: Kube, namespace: str) -> int:
    items = kube.list(API_VERSION, KIND, namespace)
    return sum(1 for i in items for c in (i.get("status") or {}).get("conditions") or []
               if c.get("type") == "Serving" and c.get("status") == "True")


def _ready_pods(kube: Kube, namespace: str) -> int:
    return sum(1 for p in kube.list("v1", "Pod", namespace) if any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (p.get("status") or {}).get("conditions") or []))


def _wait(check: Any, target: int, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check() >= target:
            return time.monotonic() - start
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not reached within {timeout:.0f}s (at {check()}/{target})")


def _namespace(kube: Kube, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kube.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": name}})
    _wait(lambda: int(kube.get("v1", "ServiceAccount", name, "default") is not None), 1, 30, "default ServiceAccount")
    return name


def _exists(kube: Kube, path: str) -> bool:
    try:
        kube.request("GET", path)
    except KubeError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _delete_namespace(kube: Kube, name: str) -> None:
    try:
        kube.request("DELETE", f"/api/v1/namespaces/{name}")
    except KubeError:
        pass


def baseline_seconds(kube: Kube, clusters: int, timeout: float) -> float:
    """Apply the rendered children of `clusters` clusters directly; time until all pods are Ready."""
    namespace = _namespace(kube, "ucm-bench-base")
    try:
        pods = 0
        start = time.monotonic()
        for i in range(clusters):
            spec = parse_cluster(bench_cluster(f"b{i:03d}", namespace))
            for child in build_children(spec):
                kube.apply(child)
            pods += sum(p.replicas for p in spec.pools) + spec.router.replicas
        _wait(lambda: _ready_pods(kube, namespace), pods, timeout, "baseline pods Ready")
        return time.monotonic() - start
    finally:
        _delete_namespace(kube, namespace)
        # Let the namespace's garbage collection finish: its deletes would otherwise land in the
        # write-count windows measured later.
        _wait(lambda: int(not _exists(kube, f"/api/v1/namespaces/{namespace}")), 1, timeout,
              "baseline namespace deleted")


def run_bench(clusters: int, timeout: float, workers: int, idle_window: float, debounce: float) -> JSON:
    kube = Kube(load_api_client(pool_size=workers + 8))
    result: JSON = {"clusters": clusters}
    nodes = add_bench_nodes(kube, clusters, timeout)
    try:
        result["baseline_direct_apply_s"] = round(baseline_seconds(kube, clusters, timeout), 2)
        result.update(_operator_bench(kube, clusters, timeout, workers, idle_window, debounce))
    finally:
        remove_bench_nodes(kube, nodes)
    return result


def _operator_bench(kube: Kube, clusters: int, timeout: float, workers: int, idle_window: float,
                    debounce: float) -> JSON:
    result: JSON = {}
    namespace = _namespace(kube, "ucm-bench")
    operator = Operator(Options(namespaces=(namespace,), workers=workers, resync_seconds=3600,
                                debounce_seconds=debounce))
    try:
        operator.start_in_thread()
        start = time.monotonic()
        for i in range(clusters):
            kube.request("POST", f"/apis/{API_VERSION}/namespaces/{namespace}/ucmclusters",
                         body=bench_cluster(f"c{i:03d}", namespace))
        _wait(lambda: _serving(kube, namespace), clusters, timeout, "UCMClusters Serving")
        result["to_serving_s"] = round(time.monotonic() - start, 2)
        result["passes_to_serving"] = operator.reconciler.passes
        result["writes_to_serving"] = operator.kube.total_writes
        if not operator.wait_idle(timeout):
            raise TimeoutError("operator did not settle after Serving")
        time.sleep(2.0)  # let the controllers' last status updates land before measuring
        # Window 1: nothing happens (baseline of writes by everyone else).
        before = write_counts(kube)
        time.sleep(idle_window)
        idle_delta = write_counts(kube) - before
        # Window 2: a full resync of every cluster.
        op_before = operator.kube.total_writes
        dry_before, calls_before = operator.kube.total_dry_runs, operator.kube.calls
        passes_before = operator.reconciler.passes
        before = write_counts(kube)
        resync_start = time.monotonic()
        operator.resync_now()
        _wait(lambda: operator.reconciler.passes - passes_before, clusters, timeout, "resync passes")
        operator.wait_idle(timeout)
        resync_s = time.monotonic() - resync_start
        time.sleep(max(0.0, idle_window - resync_s))
        resync_delta = write_counts(kube) - before
        result.update(
            resync_passes=operator.reconciler.passes - passes_before,
            resync_s=round(resync_s, 2),
            noop_resync_operator_writes=operator.kube.total_writes - op_before,
            noop_resync_operator_dry_runs=operator.kube.total_dry_runs - dry_before,
            noop_resync_operator_calls_per_cluster=round((operator.kube.calls - calls_before) / clusters, 1),
            noop_resync_apiserver_writes=operator_writes(resync_delta),
            idle_window_apiserver_writes=operator_writes(idle_delta),
            noop_resync_apiserver_writes_all=sum(resync_delta.values()),
            idle_window_apiserver_writes_all=sum(idle_delta.values()),
            window_s=idle_window,
        )
    finally:
        operator.stop()
        _delete_namespace(kube, namespace)
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    result = run_bench(args.clusters, args.timeout, args.workers, args.window, args.debounce_seconds)
    if not args.json:
        rows = [
            ("clusters", result["clusters"], ""),
            ("direct apply of the same children -> all pods Ready (baseline)", result["baseline_direct_apply_s"], "s"),
            ("UCMClusters created -> all Serving (goal <= 60 s)", result["to_serving_s"], "s"),
            ("no-op resync: reconcile passes", result["resync_passes"], ""),
            ("no-op resync: operator write calls (goal 0)", result["noop_resync_operator_writes"], ""),
            ("no-op resync: operator dry-run applies", result["noop_resync_operator_dry_runs"], ""),
            ("no-op resync: operator API calls per cluster (all reads)", result["noop_resync_operator_calls_per_cluster"],
             ""),
            ("no-op resync: API server writes on operator resources", result["noop_resync_apiserver_writes"], ""),
            ("same-length window without resync: same count (baseline)", result["idle_window_apiserver_writes"], ""),
        ]
        for label, value, unit in rows:
            print(f"{label:<66} {value}{unit}")
    print(json.dumps(result, sort_keys=True))
    return 0 if result["noop_resync_operator_writes"] == 0 else 1


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clusters", type=int, default=50, help="UCMClusters to create (default 50)")
    parser.add_argument("--workers", type=int, default=8, help="operator reconcile workers (default 8)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--window", type=float, default=5.0, help="length of each write-count window (s)")
    parser.add_argument("--debounce-seconds", type=float, default=0.5, help="as for `run` (default 0.5)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    parser.set_defaults(func=cmd_bench)

