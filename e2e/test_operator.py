"""The operator against the real control plane: the heterogeneous example reaches Serving with pods
on the right GPU products; scaling, an engine change (rolls both pools, new revision), adding and
removing a pool, drift repair, a write-free resync; deletion garbage-collects everything and the
store claim follows its reclaim policy; a pass that races its namespace's deletion stops quietly.

The operator runs as a subprocess (`ucm-operator run --namespace NS`) with a ServiceAccount token
bound to exactly the rules in charts/ucm/files/operator-rbac.yaml.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ucm_operator.kube import Kube, KubeError
from ucm_operator.reconcile import Reconciler

from e2e.access import ClusterAccess
from e2e.operator_support import (
    API,
    apply_cluster,
    condition,
    get_cluster,
    load_example,
    node_products,
    printer_columns,
    running_operator,
    wait_condition,
)
from e2e.wait import wait_for

pytestmark = pytest.mark.e2e
H100, L40S = "NVIDIA-H100-80GB-HBM3", "NVIDIA-L40S"
CHILD_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"), ("v1", "ServiceAccount"),
               ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
               ("policy/v1", "PodDisruptionBudget"), ("v1", "Pod"))


def pods_of(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in kube.list("v1", "Pod", namespace, f"ucm.dev/cluster={name}")
            if not p["metadata"].get("deletionTimestamp")]


def worker_revisions(kube: Kube, namespace: str, name: str) -> set[str]:
    return {p["metadata"]["labels"]["ucm.dev/revision"] for p in pods_of(kube, namespace, name)
            if p["metadata"]["labels"]["ucm.dev/role"] in ("prefill", "decode")}


def settled(kube: Kube, namespace: str, name: str, decode: str) -> Any:
    """Serving, rolled out (Progressing False) and no terminating pods left."""
    body = get_cluster(kube, namespace, name)
    terminating = [p for p in kube.list("v1", "Pod", namespace, f"ucm.dev/cluster={name}")
                   if p["metadata"].get("deletionTimestamp")]
    ok = (body is not None and condition(body, "Serving").get("status") == "True"
          and condition(body, "Progressing").get("status") == "False" and body["status"]["decode"] == decode
          and body["status"]["observedGeneration"] == body["metadata"]["generation"] and not terminating)
    return body if ok else None


def test_heterogeneous_cluster_lifecycle(cluster: ClusterAccess, namespace: str, kube: Kube, crd: None,
                                         tmp_path: Path) -> None:
    name = "llama-pd"
    with running_operator(cluster, namespace, tmp_path) as operator:
        body = load_example("ucmcluster-heterogeneous.yaml", namespace=namespace)
        apply_cluster(cluster, namespace, body)
        served = wait_for(lambda: settled(kube, namespace, name, "2/2"), "llama-pd Serving", timeout_s=120)
        status = served["status"]
        rev1 = status["revision"]
        assert (status["prefill"], status["decode"]) == ("1/1", "2/2")
        assert status["routerURL"] == f"http://llama-pd-router.{namespace}.svc:8000"
        # kwok's pods run no vLLM, so their /metrics cannot be read: the store's health is Unknown
        # (e2e/test_operator_store_status.py reads a real worker's).
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "Valid": "True", "StoreReady": "True", "StoreHealthy": "Unknown", "PrefillReady": "True",
            "DecodeReady": "True", "RouterReady": "True", "Serving": "True", "Progressing": "False", "Degraded": "False"}
        assert condition(served, "StoreHealthy")["reason"] == "MetricsUnavailable"
        assert printer_columns(cluster, namespace, name) | {"AGE": ""} == {
            "NAME": name, "SERVING": "True", "PREFILL": "1/1", "DECODE": "2/2", "REVISION": rev1,
            "STORE-USED": "", "HIT-RATE": "", "AGE": ""}

        # Every pod on a node of its pool's GPU product; the router on the CPU node.
        products = node_products(kube)
        placed = sorted((p["metadata"]["labels"]["ucm.dev/pool"], products[p["spec"]["nodeName"]])
                        for p in pods_of(kube, namespace, name))
        assert placed == [("h100", H100), ("l40s", L40S), ("l40s", L40S), ("router", "")]
        for pod in pods_of(kube, namespace, name):
            if pod["metadata"]["labels"]["ucm.dev/role"] == "prefill":
                assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"

        # The router discovers workers through EndpointSlices labeled by cluster and role.
        def decode_endpoints() -> int:
            slices = kube.request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                                  query=[("labelSelector", f"ucm.dev/cluster={name},ucm.dev/role=decode")])["items"]
            return sum(1 for s in slices for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready"))
        wait_for(lambda: decode_endpoints() == 2, "2 ready decode endpoints in EndpointSlices", timeout_s=30)

        # Scale the decode pool: same revision, 3/3.
        body["spec"]["decode"][0]["replicas"] = 3
        apply_cluster(cluster, namespace, body)
        status = wait_for(lambda: settled(kube, namespace, name, "3/3"), "decode 3/3", timeout_s=60)["status"]
        assert status["revision"] == rev1

        # An engine change rolls both pools onto a new revision.
        body["spec"]["engine"]["extraArgs"] += ["--max-num-seqs", "128"]
        apply_cluster(cluster, namespace, body)
        status = wait_for(lambda: (b := settled(kube, namespace, name, "3/3")) and b["status"]["revision"] != rev1
                          and worker_revisions(kube, namespace, name) == {b["status"]["revision"]} and b,
                          "rollout to a new revision", timeout_s=90)["status"]
        rev2 = status["revision"]
        for pool in ("h100", "l40s"):
            deploy = kube.get("apps/v1", "Deployment", namespace, f"{name}-{pool}")
            assert deploy is not None
            assert deploy["spec"]["template"]["metadata"]["labels"]["ucm.dev/revision"] == rev2
            assert "128" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]

        # Add a pool, then remove it: its Deployment and PDB are pruned.
        body["spec"]["decode"].append({"name": "h100-decode", "replicas": 2, "gpu": {"product": H100}})
        apply_cluster(cluster, namespace, body)
        wait_for(lambda: settled(kube, namespace, name, "5/5"), "second decode pool ready", timeout_s=60)
        assert kube.get("policy/v1", "PodDisruptionBudget", namespace, f"{name}-h100-decode") is not None
        body["spec"]["decode"].pop()
        apply_cluster(cluster, namespace, body)
        wait_for(lambda: kube.get("apps/v1", "Deployment", namespace, f"{name}-h100-decode") is None
                 and kube.get("policy/v1", "PodDisruptionBudget", namespace, f"{name}-h100-decode") is None,
                 "pruned pool", timeout_s=60)
        status = wait_for(lambda: settled(kube, namespace, name, "3/3"), "back to one decode pool", timeout_s=60)["status"]
        assert [p["name"] for p in status["pools"]] == ["h100", "l40s"] and status["revision"] == rev2

        # Drift: a manual scale and a deleted Service are repaired.
        cluster.kubectl("scale", "-n", namespace, f"deployment/{name}-l40s", "--replicas=1")
        cluster.kubectl("delete", "-n", namespace, f"service/{name}-router")
        wait_for(lambda: (d := kube.get("apps/v1", "Deployment", namespace, f"{name}-l40s")) is not None
                 and d["spec"]["replicas"] == 3 and kube.get("v1", "Service", namespace, f"{name}-router"),
                 "drift repaired", timeout_s=60)
        wait_for(lambda: settled(kube, namespace, name, "3/3"), "settled after drift", timeout_s=60)

        # A resync over a settled cluster writes nothing: no "reconciled" line between resyncs.
        # (One resync first, to let passes already queued by the last events finish.)
        operator.wait_resyncs(1, len(operator.log()))
        mark = len(operator.log())
        operator.wait_resyncs(3, mark)
        lines = operator.lines_since(mark)
        first = next(i for i, line in enumerate(lines) if "resync #" in line)
        last = max(i for i, line in enumerate(lines) if "resync #" in line)
        writes = [line for line in lines[first:last] if "reconciled " in line]
        assert writes == [], writes


@pytest.fixture
def store_volumes(kube: Kube, namespace: str) -> Iterator[str]:
    """Two static NFS PersistentVolumes the PV binder can bind claims of this storage class to."""
    storage_class = f"ucm-{namespace}"[:63]
    names = [f"{namespace}-pv-{i}" for i in range(2)]
    for pv in names:
        kube.request("POST", "/api/v1/persistentvolumes", body={
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": storage_class,
                     "nfs": {"server": "nfs.example", "path": f"/{pv}"}}})
    try:
        yield storage_class
    finally:
        for pv in names:
            kube.request("DELETE", f"/api/v1/persistentvolumes/{pv}")


def test_deletion_garbage_collects_and_claims_follow_reclaim_policy(
        cluster: ClusterAccess, namespace: str, kube: Kube, crd: None, tmp_path: Path, store_volumes: str) -> None:
    def small(name: str, policy: str) -> dict[str, Any]:
        return {"apiVersion": API, "kind": "UCMCluster", "metadata": {"name": name, "namespace": namespace},
                "spec": {"model": {"servedName": "m", "source": "hf://org/model"},
                         "store": {"pvc": {"storageClassName": store_volumes, "size": "10Gi"}, "reclaimPolicy": policy},
                         "prefill": [{"name": "p", "gpu": {"product": H100}}],
                         "decode": [{"name": "d", "gpu": {"product": L40S}}]}}

    with running_operator(cluster, namespace, tmp_path):
        for name, policy in (("keep", "Retain"), ("drop", "Delete")):
            apply_cluster(cluster, namespace, small(name, policy))
        for name in ("keep", "drop"):
            served = wait_condition(kube, namespace, name, "Serving", timeout=120)
            assert condition(served, "StoreReady")["reason"] == "Bound"
        kept = kube.get("v1", "PersistentVolumeClaim", namespace, "keep-store")
        assert kept is not None and "ownerReferences" not in kept["metadata"]
        dropped = kube.get("v1", "PersistentVolumeClaim", namespace, "drop-store")
        assert dropped is not None and dropped["metadata"]["ownerReferences"][0]["kind"] == "UCMCluster"

        cluster.kubectl("delete", "-n", namespace, "ucmc", "keep", "drop", "--wait=false")

        def leftovers() -> list[str]:
            return [f"{kind} {o['metadata']['name']}" for api_version, kind in CHILD_KINDS
                    for o in kube.list(api_version, kind, namespace, "ucm.dev/cluster in (keep,drop)")]
        wait_for(lambda: not leftovers() or None, "garbage collection of every child", timeout_s=90)
        wait_for(lambda: kube.get("v1", "PersistentVolumeClaim", namespace, "drop-store") is None,
                 "the Delete-policy claim to go", timeout_s=60)
        kept = kube.get("v1", "PersistentVolumeClaim", namespace, "keep-store")
        assert kept is not None and kept["status"]["phase"] == "Bound"

        # Re-creating the Retain cluster adopts the same claim (and its cached KV).
        apply_cluster(cluster, namespace, small("keep", "Retain"))
        wait_condition(kube, namespace, "keep", "Serving", timeout=90)
        again = kube.get("v1", "PersistentVolumeClaim", namespace, "keep-store")
        assert again is not None and again["metadata"]["uid"] == kept["metadata"]["uid"]


def test_unschedulable_pool_is_reported(cluster: ClusterAccess, namespace: str, kube: Kube, crd: None,
                                        tmp_path: Path) -> None:
    """A GPU product no node has: the pods stay Pending, and the status says so instead of Serving."""
    body = load_example("ucmcluster-heterogeneous.yaml", name="nowhere", namespace=namespace)
    body["spec"]["decode"][0]["gpu"]["product"] = "NVIDIA-B200"
    with running_operator(cluster, namespace, tmp_path):
        apply_cluster(cluster, namespace, body)
        found = wait_condition(kube, namespace, "nowhere", "Degraded", timeout=60,
                               extra=lambda b: condition(b, "Degraded")["reason"] == "Unschedulable")
        assert "l40s:" in condition(found, "Degraded")["message"]
        assert condition(found, "Serving")["status"] == "False"
        assert condition(found, "PrefillReady")["status"] == "True"
        assert condition(found, "DecodeReady")["status"] == "False"


class _SnapshotKube(Kube):
    """The operator's Kube, except that reading the UCMCluster returns the body read before its
    namespace began terminating: the pass then runs exactly as in the race (read just before the
    delete, apply just after), with every write answered by the real API server."""

    def __init__(self, kube: Kube, snapshot: dict[str, Any]) -> None:
        super().__init__(kube.api)
        self.snapshot = snapshot

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        if (api_version, kind) == (API, "UCMCluster"):
            return self.snapshot
        return super().get(api_version, kind, namespace, name)


def test_pass_over_a_terminating_namespace_stops_without_error(cluster: ClusterAccess, kube: Kube, crd: None) -> None:
    """The API answers creates in a terminating namespace with 403 Forbidden (cause
    NamespaceTerminating). That is no RBAC denial and nothing to retry: the pass stops quietly,
    without a Warning event or an error, and the namespace controller deletes the cluster."""
    ns = f"e2e-terminating-{uuid.uuid4().hex[:6]}"
    kube.request("POST", "/api/v1/namespaces",
                 body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"ucm.dev/e2e": "true"}}})
    # A finalizer nobody removes until the end keeps the namespace in Terminating.
    hold = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "hold", "namespace": ns,
                                                                  "finalizers": ["ucm.dev/e2e-hold"]}}
    try:
        wait_for(lambda: kube.get("v1", "ServiceAccount", ns, "default"), f"ServiceAccount {ns}/default", timeout_s=30)
        kube.request("POST", f"/api/v1/namespaces/{ns}/configmaps", body=hold)
        apply_cluster(cluster, ns, load_example("ucmcluster-heterogeneous.yaml", name="late", namespace=ns))
        snapshot = get_cluster(kube, ns, "late")
        assert snapshot is not None
        kube.request("DELETE", f"/api/v1/namespaces/{ns}")
        wait_for(lambda: get_cluster(kube, ns, "late") is None or None,
                 "the namespace controller to delete the UCMCluster", timeout_s=60)

        with pytest.raises(KubeError) as refused:
            kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "new", "namespace": ns}})
        assert refused.value.status == 403 and refused.value.namespace_terminating

        outcome = Reconciler(_SnapshotKube(kube, snapshot)).reconcile(ns, "late")
        assert outcome.namespace_terminating
        assert outcome.errors == [] and outcome.writes == 0 and outcome.events == 0
    finally:
        kube.request("PATCH", f"/api/v1/namespaces/{ns}/configmaps/hold", body={"metadata": {"finalizers": None}},
                     content_type="application/merge-patch+json")
