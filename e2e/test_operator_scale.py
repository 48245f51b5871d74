"""Per-pool scaling through the UCMPool's Scale subresource, against the real control plane and the
operator as a subprocess under the chart's RBAC rules (docs/scaling.md):

- every pool gets a UCMPool owned by its UCMCluster, with desired/ready columns and the pool's pod
  selector in status (what /scale reports);
- a PATCH of /scale (what `kubectl scale` and an HPA send) resizes the pool's Deployment, and
  resyncs do not revert it; the operator answers it with exactly one apply (the Deployment);
- an edit of the pool's replicas in the UCMCluster re-bases the UCMPool (the edit wins, once); an
  unrelated spec edit does not;
- an autoscaling/v2 HPA targeting a UCMPool is accepted, and the real HPA controller reads its /scale
  and selector (AbleToScale=True). There is no metrics server here, so the HPA cannot decide on a
  metric (ScalingActive=False); what it would then write is the /scale update this test sends.

It also measures what one scaling decision costs: seconds from the /scale write to the pool's new
pods being Ready (the UCMCluster's status says so), and the operator's writes for it, printed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from ucm_operator.kube import Kube

from e2e.access import ClusterAccess
from e2e.operator_support import (
    API,
    OperatorProcess,
    apply_cluster,
    condition,
    get_cluster,
    load_example,
    running_operator,
)
from e2e.wait import wait_for

pytestmark = pytest.mark.e2e
NAME = "scale"
DECODE, PREFILL = f"{NAME}-l40s", f"{NAME}-h100"
PASS_LINE = re.compile(r"reconciled \S+: applied (\d+), pruned (\d+), status (\w+), pool statuses (\d+), events (\d+)")


def pool(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    found = kube.get(API, "UCMPool", namespace, name)
    assert found is not None, f"UCMPool {name} does not exist"
    return found


def deployment_replicas(kube: Kube, namespace: str, name: str) -> int:
    found = kube.get("apps/v1", "Deployment", namespace, name)
    return int((found or {}).get("spec", {}).get("replicas", -1))


def settled(kube: Kube, namespace: str, decode: str, replicas: int) -> dict[str, Any] | None:
    """Serving and rolled out with `decode` ready/desired decode pods, the Deployment and the
    UCMPool agreeing on `replicas`, and the UCMPool's status caught up."""
    body = get_cluster(kube, namespace, NAME)
    scaler = kube.get(API, "UCMPool", namespace, DECODE)
    ok = (body is not None and scaler is not None and body["status"].get("decode") == decode
          and condition(body, "Serving").get("status") == "True"
          and condition(body, "Progressing").get("status") == "False"
          and body["status"].get("observedGeneration") == body["metadata"]["generation"]
          and deployment_replicas(kube, namespace, DECODE) == replicas
          and scaler["spec"].get("replicas") == replicas
          and (scaler.get("status") or {}).get("readyReplicas") == replicas
          and (scaler.get("status") or {}).get("observedGeneration") == scaler["metadata"]["generation"])
    return body if ok else None


def operator_writes(operator: OperatorProcess, since: int) -> dict[str, int]:
    """The operator's writes logged after log offset `since`, by kind of write."""
    totals = {"passes": 0, "applied": 0, "pruned": 0, "cluster status": 0, "pool statuses": 0, "events": 0}
    for line in operator.lines_since(since):
        match = PASS_LINE.search(line)
        if match:
            applied, pruned, status, pools, events = match.groups()
            totals["passes"] += 1
            totals["applied"] += int(applied)
            totals["pruned"] += int(pruned)
            totals["cluster status"] += int(status == "written")
            totals["pool statuses"] += int(pools)
            totals["events"] += int(events)
    return totals


def scale_path(namespace: str, name: str) -> str:
    return f"/apis/{API}/namespaces/{namespace}/ucmpools/{name}/scale"


def hpa_condition(kube: Kube, namespace: str, name: str, type_: str) -> dict[str, Any]:
    hpa = kube.request("GET", f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers/{name}")
    return next((c for c in (hpa.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def test_pools_scale_through_their_scale_subresource(cluster: ClusterAccess, namespace: str, kube: Kube, crd: None,
                                                     tmp_path: Path) -> None:
    body = load_example("ucmcluster-heterogeneous.yaml", name=NAME, namespace=namespace)
    with running_operator(cluster, namespace, tmp_path) as operator:
        apply_cluster(cluster, namespace, body)
        served = wait_for(lambda: settled(kube, namespace, "2/2", 2), "Serving with 2 decode pods", timeout_s=120)

        # One UCMPool per pool, owned by the UCMCluster, sized from it, selector in status.
        uid = served["metadata"]["uid"]
        for name, role, replicas in ((PREFILL, "prefill", 1), (DECODE, "decode", 2)):
            scaler = pool(kube, namespace, name)
            (owner,) = scaler["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["uid"], owner["controller"]) == ("UCMCluster", uid, True)
            assert scaler["spec"] == {"cluster": NAME, "role": role, "pool": name.removeprefix(f"{NAME}-"),
                                      "replicas": replicas, "clusterReplicas": replicas}
            assert scaler["status"]["selector"] == (f"ucm.dev/cluster={NAME},ucm.dev/pool={scaler['spec']['pool']},"
                                                    f"ucm.dev/role={role}")
        header, *rows = cluster.kubectl("get", "ucmp", "-n", namespace).stdout.splitlines()
        assert header.split() == ["NAME", "CLUSTER", "ROLE", "DESIRED", "READY", "AGE"]
        assert sorted(r.split()[:5] for r in rows) == [[PREFILL, NAME, "prefill", "1", "1"],
                                                        [DECODE, NAME, "decode", "2", "2"]]
        scale = kube.request("GET", scale_path(namespace, DECODE))
        assert scale["kind"] == "Scale" and scale["spec"] == {"replicas": 2}
        assert scale["status"] == {"replicas": 2, "selector": pool(kube, namespace, DECODE)["status"]["selector"]}
        # The selector selects exactly the pool's pods (what an HPA counts).
        pods = kube.list("v1", "Pod", namespace, scale["status"]["selector"])
        assert sorted(p["metadata"]["labels"]["ucm.dev/pool"] for p in pods) == ["l40s", "l40s"]

        # /scale, as `kubectl scale` and an HPA write it: the Deployment follows; one apply.
        wait_for(lambda: operator_writes(operator, 0)["passes"] > 0 or None, "a logged pass", timeout_s=10)
        operator.wait_resyncs(1, len(operator.log()))
        mark = len(operator.log())
        start = time.monotonic()
        kube.request("PATCH", scale_path(namespace, DECODE), body={"spec": {"replicas": 3}},
                     content_type="application/merge-patch+json")
        wait_for(lambda: settled(kube, namespace, "3/3", 3), "decode scaled to 3 through /scale", timeout_s=60)
        scaled_s = time.monotonic() - start
        operator.wait_resyncs(2, mark)   # trailing status writes land; resyncs do not revert /scale
        writes = operator_writes(operator, mark)
        print(f"/scale 2->3: {scaled_s:.2f}s to 3/3 Ready; operator writes {writes}")
        assert writes["applied"] == 1 and writes["pruned"] == 0, writes   # the Deployment, nothing else
        assert deployment_replicas(kube, namespace, DECODE) == 3 and pool(kube, namespace, DECODE)["spec"]["replicas"] == 3
        owners = {f["manager"]: f for f in pool(kube, namespace, DECODE)["metadata"]["managedFields"]
                  if "f:replicas" in (f.get("fieldsV1") or {}).get("f:spec", {})}
        assert "ucm-operator-rebase" not in owners and "ucm-operator" not in owners, sorted(owners)

        # The real CLI, through the same subresource.
        cluster.kubectl("scale", "-n", namespace, f"ucmpool/{DECODE}", "--replicas=4")
        wait_for(lambda: settled(kube, namespace, "4/4", 4), "decode scaled to 4 by kubectl scale", timeout_s=60)

        # An unrelated edit of the UCMCluster keeps the /scale size (the decode value is still 2).
        body["spec"]["router"]["policy"] = "least-loaded"
        apply_cluster(cluster, namespace, body)
        wait_for(lambda: (b := settled(kube, namespace, "4/4", 4)) and b["metadata"]["generation"] == 2
                 and b["status"]["observedGeneration"] == 2, "router edit applied, decode still 4", timeout_s=60)

        # An edit of the pool's replicas in the UCMCluster re-bases it: the edit wins.
        mark = len(operator.log())
        start = time.monotonic()
        body["spec"]["decode"][0]["replicas"] = 1
        apply_cluster(cluster, namespace, body)
        wait_for(lambda: settled(kube, namespace, "1/1", 1), "decode re-based to 1 by the UCMCluster", timeout_s=60)
        rebased_s = time.monotonic() - start
        assert pool(kube, namespace, DECODE)["spec"]["clusterReplicas"] == 1
        operator.wait_resyncs(2, mark)
        writes = operator_writes(operator, mark)
        print(f"UCMCluster edit 4->1: {rebased_s:.2f}s to 1/1; operator writes {writes}")
        assert writes["applied"] == 2 and writes["pruned"] == 1, writes  # re-base + Deployment; the PDB goes

        # An HPA targeting the UCMPool: accepted, and the HPA controller can read its /scale.
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "decode", "namespace": namespace},
               "spec": {"scaleTargetRef": {"apiVersion": API, "kind": "UCMPool", "name": DECODE},
                        "minReplicas": 1, "maxReplicas": 4,
                        "metrics": [{"type": "Resource", "resource": {
                            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}}]}}
        created = kube.request("POST", f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers", body=hpa)
        assert created["spec"]["scaleTargetRef"]["kind"] == "UCMPool"
        able = wait_for(lambda: (c := hpa_condition(kube, namespace, "decode", "AbleToScale")).get("status") == "True"
                        and c, "the HPA controller to read the UCMPool's /scale", timeout_s=90)
        assert able["reason"] == "SucceededGetScale", able
        # It got as far as metrics for the selected pods (a missing selector would stop it
        # earlier, as InvalidSelector); with no metrics API here it cannot go further.
        active = wait_for(lambda: hpa_condition(kube, namespace, "decode", "ScalingActive") or None,
                          "the HPA's ScalingActive condition", timeout_s=60)
        assert (active["status"], active["reason"]) == ("False", "FailedGetResourceMetric"), active
        assert deployment_replicas(kube, namespace, DECODE) == 1
