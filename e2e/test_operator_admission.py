"""Issue 21 on the real control plane: every generated invalid UCMCluster (e2e/admission_cases.py)
is refused up front, naming the user's own field — by the API server's CRD schema at `kubectl
apply`, or by the operator as Valid=False (its dry run of the children, its vLLM argument rules,
the live nodes and claims) — and no child object exists for any of them; a valid control
cluster in the same namespace, reconciled by the same operator, gets its children.

All cases share one namespace and one operator process, so a hundred cases cost about as much
as a few: the operator reconciles them concurrently and the test polls them with one list.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
from pathlib import Path
from typing import Any

import pytest
from ucm_operator.kube import CHILD_KINDS, Kube

from e2e.access import ClusterAccess
from e2e.admission_cases import Case, cases, claim
from e2e.nodes import NodePool, build_node
from e2e.operator_support import API, apply_cluster, condition, load_example, running_operator, wait_condition
from e2e.wait import wait_for

pytestmark = pytest.mark.e2e
CONTROL = "adm-valid"
# Every class has cases the CRD cannot see, which only the operator refuses.
MIN_ADMITTED = {"k8s": 60, "vllm": 80, "facts": 40}


def _prerequisites(cluster: ClusterAccess, namespace: str, all_cases: list[Case]) -> None:
    """Objects some cases refer to (claims), created before any case."""
    for case in all_cases:
        for manifest in case.needs:
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def _settled(kube: Kube, namespace: str, names: set[str]) -> dict[str, Any] | None:
    """{name: body} once every named cluster has a Valid condition for its generation."""
    bodies = {b["metadata"]["name"]: b for b in kube.list(API, "UCMCluster", namespace)}
    for name in names:
        body = bodies.get(name)
        status = (body or {}).get("status") or {}
        if not body or status.get("observedGeneration") != body["metadata"]["generation"] or not condition(body, "Valid"):
            return None
    return bodies


def test_generated_invalid_clusters_are_refused_naming_the_field(cluster: ClusterAccess, namespace: str, kube: Kube,
                                                                 crd: None, tmp_path: Path) -> None:
    all_cases = cases()
    _prerequisites(cluster, namespace, all_cases)
    rejected: dict[str, str] = {}
    failures: list[str] = []
    with running_operator(cluster, namespace, tmp_path, resync_seconds=30.0):
        apply_cluster(cluster, namespace, load_example("ucmcluster-heterogeneous.yaml", name=CONTROL,
                                                       namespace=namespace))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:   # kubectl's start-up is most of an apply
            results = pool.map(lambda c: apply_cluster(cluster, namespace, c.body(namespace), check=False), all_cases)
            for case, result in zip(all_cases, results, strict=True):
                if result.returncode != 0:
                    rejected[case.name] = result.stderr.strip()
        admitted = [c for c in all_cases if c.name not in rejected]
        bodies: dict[str, Any] = wait_for(lambda: _settled(kube, namespace, {CONTROL, *(c.name for c in admitted)}),
                                          f"a Valid condition on {len(admitted) + 1} clusters", timeout_s=240)
        events = [e for e in kube.list("v1", "Event", namespace) if e["type"] == "Warning"]
    assert condition(bodies[CONTROL], "Valid")["status"] == "True", bodies[CONTROL]["status"]
    for case in all_cases:
        if case.name in rejected:
            if case.field not in rejected[case.name]:
                failures.append(f"{case.name} ({case.what}): kubectl refused without naming {case.field}: "
                                f"{rejected[case.name]}")
            continue
        valid = condition(bodies[case.name], "Valid")
        if valid["status"] != "False" or case.field not in valid["message"]:
            failures.append(f"{case.name} ({case.what}): expected Valid=False naming {case.field}, got {valid}")
        elif condition(bodies[case.name], "Degraded").get("reason") != "InvalidSpec":
            failures.append(f"{case.name}: Degraded is {condition(bodies[case.name], 'Degraded')}")
        elif not any(e["involvedObject"].get("name") == case.name and case.field in e["message"] for e in events):
            failures.append(f"{case.name}: no Warning event naming {case.field}")
    # No child of any case exists; the control's do (so the listing itself works).
    owners: collections.Counter[str] = collections.Counter()
    for api_version, kind in CHILD_KINDS:
        for obj in kube.list(api_version, kind, namespace, "ucm.dev/cluster"):
            owners[obj["metadata"]["labels"]["ucm.dev/cluster"]] += 1
    created = {name: count for name, count in owners.items() if name != CONTROL}
    assert owners[CONTROL] >= 10, owners
    assert created == {}, f"children exist for invalid clusters: {created}"
    assert failures == [], "\n".join(failures)
    per_class = collections.Counter(c.cls for c in all_cases if c.name not in rejected)
    print(f"{len(all_cases)} cases: {len(rejected)} refused by the CRD, by the operator per class: {dict(per_class)}")
    for cls, least in MIN_ADMITTED.items():
        if any(c.cls == cls for c in all_cases):
            assert per_class[cls] >= least, (cls, per_class, {n: r for n, r in rejected.items() if cls in n})


def test_refusals_are_rechecked_when_nodes_or_claims_change(cluster: ClusterAccess, namespace: str, kube: Kube,
                                                             crd: None, tmp_path: Path) -> None:
    """No resync timer here (an hour): only the node and claim watches can bring the change."""
    product = "UCM-RECHECK-GPU"
    small, big = (build_node(NodePool(f"ucm-recheck-{size}", 1, cpu="8", memory="64Gi", gpu_product=product,
                                      gpus=gpus), 0, ordinal=90 + gpus) for size, gpus in (("small", 2), ("big", 16)))
    gpu = load_example("ucmcluster-heterogeneous.yaml", name="recheck-gpu", namespace=namespace)
    gpu["spec"]["decode"][0]["gpu"] = {"product": product, "count": 12}
    store = load_example("ucmcluster-heterogeneous.yaml", name="recheck-claim", namespace=namespace)
    store["spec"]["store"] = {"existingClaim": "grow", "capacity": "20Gi"}
    nodes = []
    try:
        for node in (small,):
            cluster.kubectl("create", "-f", "-", input=json.dumps(node))
            nodes.append(node["metadata"]["name"])
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(claim("grow", "10Gi", ["ReadWriteMany"])))
        with running_operator(cluster, namespace, tmp_path, resync_seconds=3600.0):
            apply_cluster(cluster, namespace, gpu)
            apply_cluster(cluster, namespace, store)
            refused = wait_condition(kube, namespace, "recheck-gpu", "Valid", "False", timeout=60)
            assert "spec.decode[0].gpu.count" in condition(refused, "Valid")["message"]
            assert "at most 2" in condition(refused, "Valid")["message"]
            refused = wait_condition(kube, namespace, "recheck-claim", "Valid", "False", timeout=60)
            assert "spec.store.capacity" in condition(refused, "Valid")["message"]

            cluster.kubectl("create", "-f", "-", input=json.dumps(big))      # a node with 16 GPUs appears
            nodes.append(big["metadata"]["name"])
            wait_condition(kube, namespace, "recheck-gpu", "Valid", "True", timeout=60)
            wait_for(lambda: kube.list("apps/v1", "Deployment", namespace, "ucm.dev/cluster=recheck-gpu"),
                     "recheck-gpu's Deployments")

            cluster.kubectl("delete", "-n", namespace, "pvc", "grow", "--wait=true")   # and a larger claim
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(claim("grow", "30Gi",
                                                                                       ["ReadWriteMany"])))
            wait_condition(kube, namespace, "recheck-claim", "Valid", "True", timeout=60)
    finally:
        for name in nodes:
            cluster.kubectl("delete", "node", name, "--ignore-not-found", check=False)
