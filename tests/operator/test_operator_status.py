"""status.compute_status from synthetic children: the conditions tell the truth."""

from __future__ import annotations

from typing import Any

import pytest
from ucm_operator.compat import Problem
from ucm_operator.meta import revision
from ucm_operator.spec import ClusterSpec, parse_cluster
from ucm_operator.status import Observed, compute_status


def deployment(role: str, pool: str, rev: str | None, replicas: int, ready: int, updated: int | None = None,
               generation: int = 1, observed: int = 1) -> dict[str, Any]:
    labels = {"ucm.dev/role": role, "ucm.dev/pool": pool}
    if rev:
        labels["ucm.dev/revision"] = rev
    return {"metadata": {"name": pool, "labels": labels, "generation": generation},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas if updated is None else updated}}


def pod(role: str, rev: str, ready: bool = True, pool: str = "p", **extra: Any) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}, *extra.get("conditions", [])]
    return {"metadata": {"labels": {"ucm.dev/role": role, "ucm.dev/revision": rev, "ucm.dev/pool": pool}},
            "status": {"conditions": conditions}}


def healthy(spec: ClusterSpec) -> Observed:
    rev = revision(spec)
    return Observed(
        spec=spec, generation=3, revision=rev,
        deployments=[deployment("prefill", "h100", rev, 1, 1), deployment("decode", "l40s", rev, 2, 2),
                     deployment("router", "router", rev, 1, 1)],
        pods=[pod("prefill", rev, pool="h100"), pod("decode", rev, pool="l40s"), pod("decode", rev, pool="l40s"),
              pod("router", "", pool="router")],
    )


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_healthy_cluster_is_serving(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    status = compute_status(healthy(spec), None)
    assert conditions(status) == {
        "Valid": ("True", "Valid"), "StoreReady": ("True", "NFS"), "PrefillReady": ("True", "PoolsReady"),
        "DecodeReady": ("True", "PoolsReady"), "RouterReady": ("True", "Ready"), "Serving": ("True", "Serving"),
        "Progressing": ("False", "Stable"), "Degraded": ("False", "AsExpected"),
    }
    assert (status["prefill"], status["decode"], status["observedGeneration"]) == ("1/1", "2/2", 3)
    assert status["revision"] == revision(spec)
    assert status["routerURL"] == "http://llama-pd-router.ns1.svc:8000"
    assert status["pools"] == [{"name": "h100", "role": "prefill", "desired": 1, "ready": 1, "updated": 1},
                               {"name": "l40s", "role": "decode", "desired": 2, "ready": 2, "updated": 2}]


def test_recomputing_is_identical(hetero: dict[str, Any]) -> None:
    """A resync over an unchanged world produces an equal object: no status patch."""
    observed = healthy(parse_cluster(hetero))
    first = compute_status(observed, None)
    assert compute_status(observed, first) == first


def test_transition_time_moves_only_on_change(hetero: dict[str, Any]) -> None:
    observed = healthy(parse_cluster(hetero))
    first = compute_status(observed, None)
    for cond in first["conditions"]:
        cond["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    observed.pods = [p for p in observed.pods if p["metadata"]["labels"]["ucm.dev/role"] != "prefill"]
    second = {c["type"]: c for c in compute_status(observed, first)["conditions"]}
    assert second["Serving"]["status"] == "False" and second["Serving"]["lastTransitionTime"] != "2000-01-01T00:00:00Z"
    assert second["Valid"]["lastTransitionTime"] == "2000-01-01T00:00:00Z"


def test_ready_pods_of_different_revisions_do_not_serve(hetero: dict[str, Any]) -> None:
    observed = healthy(parse_cluster(hetero))
    observed.pods = [pod("prefill", "old"), pod("decode", "new"), pod("router", "")]
    status = compute_status(observed, None)
    assert conditions(status)["Serving"] == ("False", "NoReadyPair")
    observed.pods.append(pod("decode", "old"))  # an old-revision pair still serves mid-rollout
    assert conditions(compute_status(observed, None))["Serving"] == ("True", "Serving")


def test_terminating_and_unready_pods_do_not_count(hetero: dict[str, Any]) -> None:
    observed = healthy(parse_cluster(hetero))
    rev = observed.revision
    gone = pod("prefill", rev)
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    observed.pods = [gone, pod("prefill", rev, ready=False), pod("decode", rev), pod("router", "")]
    assert conditions(compute_status(observed, None))["Serving"] == ("False", "NoReadyPair")


@pytest.mark.parametrize(("claim", "store", "serving"), [
    (None, ("False", "ClaimNotFound"), ("False", "StoreNotReady")),
    ({"metadata": {"name": "c"}, "status": {"phase": "Pending"}}, ("False", "ClaimNotBound"), ("False", "StoreNotReady")),
    ({"metadata": {"name": "c"}, "status": {"phase": "Bound"}}, ("True", "Bound"), ("True", "Serving")),
])
def test_store_must_be_bound(hetero: dict[str, Any], claim: Any, store: Any, serving: Any) -> None:
    hetero["spec"]["store"] = {"pvc": {"size": "1Ti"}}
    observed = healthy(parse_cluster(hetero))
    observed.claim = claim
    found = conditions(compute_status(observed, None))
    assert (found["StoreReady"], found["Serving"]) == (store, serving)


def test_router_must_be_ready(hetero: dict[str, Any]) -> None:
    observed = healthy(parse_cluster(hetero))
    observed.deployments = [*observed.deployments[:2], deployment("router", "router", None, 1, 0)]
    found = conditions(compute_status(observed, None))
    assert found["RouterReady"] == ("False", "NotReady") and found["Serving"] == ("False", "RouterNotReady")


def test_rollout_in_progress(hetero: dict[str, Any]) -> None:
    observed = healthy(parse_cluster(hetero))
    # decode pool still on the old revision (label) -> not updated, not complete
    observed.deployments[1] = deployment("decode", "l40s", "old", 2, 2)
    status = compute_status(observed, None)
    assert conditions(status)["DecodeReady"] == ("False", "PoolsNotReady")
    assert conditions(status)["Progressing"] == ("True", "RollingOut")
    assert status["pools"][1]["updated"] == 0
    observed.applied = 2
    assert conditions(compute_status(observed, None))["Progressing"] == ("True", "Applied")


def test_unschedulable_pods_degrade(hetero: dict[str, Any]) -> None:
    observed = healthy(parse_cluster(hetero))
    stuck = pod("decode", observed.revision, ready=False, pool="l40s", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/5 nodes are available"}])
    observed.pods = [*observed.pods, stuck]
    degraded = next(c for c in compute_status(observed, None)["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert "l40s: 0/5 nodes are available" in degraded["message"]


def test_invalid_spec_reports_what_runs(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    observed = healthy(spec)
    previous = compute_status(observed, None)
    observed.problems = [Problem("spec.prefill[0].extraArgs", "IncompatiblePools", "differs")]
    observed.revision = "newrev"
    status = compute_status(observed, previous)
    found = conditions(status)
    assert found["Valid"] == ("False", "IncompatiblePools") and found["Degraded"] == ("True", "InvalidSpec")
    assert found["Serving"] == ("True", "Serving")  # the old pods keep serving
    assert status["revision"] == previous["revision"]
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert valid["message"] == "spec.prefill[0].extraArgs: differs"


def test_decode_only_serves_without_prefill() -> None:
    from operator_helpers import load_example

    spec = parse_cluster(load_example("ucmcluster-decode-only.yaml"))
    rev = revision(spec)
    observed = Observed(spec=spec, generation=1, revision=rev,
                        deployments=[deployment("decode", "l40s", rev, 3, 3), deployment("router", "router", None, 1, 1)],
                        pods=[pod("decode", rev), pod("router", "")],
                        claim={"metadata": {"name": "ucm-kv-cache"}, "status": {"phase": "Bound"}})
    found = conditions(compute_status(observed, None))
    assert found["PrefillReady"] == ("True", "NoPools") and found["Serving"] == ("True", "Serving")
