"""UCMPools: one per pool, its Scale subresource; who wins between the UCMCluster's replicas and
/scale (scale.plan_replicas), and that a /scale write is no drift the operator re-applies over."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from operator_helpers import ROOT
from test_operator_crd import to_jsonschema
from ucm_operator.build import build_children
from ucm_operator.constants import ANNOTATION_APPLIED_HASH
from ucm_operator.reconcile import Reconciler
from ucm_operator.scale import (
    PoolReplicas,
    build_rebase,
    plan_replicas,
    pool_status,
    scaler_version,
    scalers_by_pool,
    with_replicas,
)
from ucm_operator.spec import ClusterSpec, parse_cluster

POOL_CRD = ROOT / "crds" / "ucm.dev_ucmpools.yaml"


def pool_crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(POOL_CRD.read_text())
    return doc


def pool_schema() -> dict[str, Any]:
    (version,) = pool_crd()["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def live_scaler(spec: ClusterSpec, pool: str, replicas: int | None, base: int | None,
                generation: int = 2) -> dict[str, Any]:
    """A UCMPool as the API server returns it after the operator's apply (and maybe a /scale)."""
    (obj,) = [copy.deepcopy(c) for c in build_children(spec)
              if c["kind"] == "UCMPool" and c["spec"]["pool"] == pool]
    obj["metadata"].update(uid=f"uid-{pool}", generation=generation, resourceVersion="7")
    if replicas is not None:
        obj["spec"]["replicas"] = replicas
    if base is not None:
        obj["spec"]["clusterReplicas"] = base
    return obj


def test_the_crd_has_a_scale_subresource_an_hpa_can_use() -> None:
    doc = pool_crd()
    assert doc["metadata"]["name"] == "ucmpools.ucm.dev" and doc["spec"]["scope"] == "Namespaced"
    assert doc["spec"]["names"]["kind"] == "UCMPool" and doc["spec"]["names"]["shortNames"] == ["ucmp"]
    (version,) = doc["spec"]["versions"]
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Cluster": ".spec.cluster", "Role": ".spec.role", "Desired": ".spec.replicas",
                       "Ready": ".status.readyReplicas", "Age": ".metadata.creationTimestamp"}
    # Both fields a re-base writes must exist, and a UCMPool must be creatable without a size
    # (the operator's main apply never carries one).
    spec_schema = pool_schema()["properties"]["spec"]
    assert {"replicas", "clusterReplicas"} <= set(spec_schema["properties"])
    assert "replicas" not in spec_schema["required"]


def test_chart_ships_the_same_pool_crd() -> None:
    assert (ROOT / "charts" / "ucm" / "crds" / POOL_CRD.name).read_bytes() == POOL_CRD.read_bytes()


def test_one_owned_pool_object_per_pool_without_a_size(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    kids = [c for c in build_children(spec) if c["kind"] == "UCMPool"]
    assert [(k["metadata"]["name"], k["spec"]["role"], k["spec"]["pool"]) for k in kids] == [
        ("llama-pd-h100", "prefill", "h100"), ("llama-pd-l40s", "decode", "l40s")]
    validator = jsonschema.Draft7Validator(to_jsonschema(pool_schema()))
    for kid in kids:
        assert kid["apiVersion"] == "ucm.dev/v1alpha1"
        assert kid["metadata"]["ownerReferences"][0]["kind"] == "UCMCluster"
        assert kid["metadata"]["labels"]["ucm.dev/pool"] == kid["spec"]["pool"]
        assert kid["spec"]["cluster"] == "llama-pd"
        assert "replicas" not in kid["spec"] and "clusterReplicas" not in kid["spec"]
        assert ANNOTATION_APPLIED_HASH in kid["metadata"]["annotations"]
        assert list(validator.iter_errors(kid)) == []


def test_rebase_sets_size_and_base_in_one_partial_object(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    rebase = build_rebase(spec, spec.decode[0])
    assert rebase == {"apiVersion": "ucm.dev/v1alpha1", "kind": "UCMPool",
                      "metadata": {"name": "llama-pd-l40s", "namespace": "ns1"},
                      "spec": {"replicas": 2, "clusterReplicas": 2}}


def test_new_pools_and_crash_leftovers_are_rebased_to_the_cluster_value(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    assert plan_replicas(spec, {}) == {"h100": PoolReplicas("h100", 1, True), "l40s": PoolReplicas("l40s", 2, True)}
    # Created by the main apply, killed before the re-base: no size yet.
    leftover = {"l40s": live_scaler(spec, "l40s", None, None)}
    assert plan_replicas(spec, leftover)["l40s"] == PoolReplicas("l40s", 2, True)


def test_scale_wins_until_the_cluster_value_is_edited(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    # /scale (or an HPA) set 5 after the operator's base 2: 5 stays, on every pass.
    scaled = {"l40s": live_scaler(spec, "l40s", 5, 2), "h100": live_scaler(spec, "h100", 1, 1)}
    plan = plan_replicas(spec, scaled)
    assert plan == {"h100": PoolReplicas("h100", 1, False), "l40s": PoolReplicas("l40s", 5, False)}
    # Scaled to zero is a size too, not "unset".
    assert plan_replicas(spec, {"l40s": live_scaler(spec, "l40s", 0, 2)})["l40s"] == PoolReplicas("l40s", 0, False)
    # The user edits the UCMCluster's decode replicas 2 -> 3: that edit wins, once.
    edited = copy.deepcopy(hetero)
    edited["spec"]["decode"][0]["replicas"] = 3
    assert plan_replicas(parse_cluster(edited), scaled)["l40s"] == PoolReplicas("l40s", 3, True)
    # Re-based (base 3) and scaled again to 4: /scale wins again.
    rescaled = {"l40s": live_scaler(spec, "l40s", 4, 3)}
    assert plan_replicas(parse_cluster(edited), rescaled)["l40s"] == PoolReplicas("l40s", 4, False)


def test_the_deployment_and_pdb_follow_the_planned_size(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    sized = with_replicas(spec, {"h100": PoolReplicas("h100", 3, False), "l40s": PoolReplicas("l40s", 1, False)})
    kids = {(c["kind"], c["metadata"]["name"]): c for c in build_children(sized)}
    assert kids[("Deployment", "llama-pd-h100")]["spec"]["replicas"] == 3
    assert kids[("Deployment", "llama-pd-l40s")]["spec"]["replicas"] == 1
    # A PDB exists for pools of 2+ pods: now the prefill pool's, no longer the decode pool's.
    assert ("PodDisruptionBudget", "llama-pd-h100") in kids and ("PodDisruptionBudget", "llama-pd-l40s") not in kids
    # The pool objects themselves do not change with the size: a /scale write causes no apply.
    assert ([c for c in build_children(sized) if c["kind"] == "UCMPool"]
            == [c for c in build_children(spec) if c["kind"] == "UCMPool"])


def test_a_scale_write_is_not_drift_but_an_edit_of_the_pool_object_is(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    desired = build_children(spec)[-1]
    applied = live_scaler(spec, "l40s", 2, 2, generation=2)
    reconciler = Reconciler(kube=None)  # type: ignore[arg-type]  # needs_apply never calls the API
    reconciler._remember(applied, desired["metadata"]["annotations"][ANNOTATION_APPLIED_HASH])
    scaled = live_scaler(spec, "l40s", 7, 2, generation=3)
    assert scaler_version(scaled) == scaler_version(applied)
    assert not reconciler.needs_apply(desired, scaled)
    rebased = live_scaler(spec, "l40s", 3, 3, generation=4)
    assert not reconciler.needs_apply(desired, rebased)
    relabelled = live_scaler(spec, "l40s", 7, 2, generation=3)
    relabelled["metadata"]["labels"]["ucm.dev/pool"] = "other"
    assert reconciler.needs_apply(desired, relabelled)


def test_pool_status_comes_from_the_deployment(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    sized = with_replicas(spec, {"l40s": PoolReplicas("l40s", 3, False)})
    pool = sized.decode[0]
    scaler = live_scaler(spec, "l40s", 3, 2, generation=5)
    deployment = {"spec": {"replicas": 3}, "status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3}}
    status = pool_status(sized, pool, scaler, deployment)
    assert status == {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3, "observedGeneration": 5,
                      "selector": "ucm.dev/cluster=llama-pd,ucm.dev/pool=l40s,ucm.dev/role=decode"}
    jsonschema.Draft7Validator(to_jsonschema(pool_schema()["properties"]["status"])).validate(status)
    # Not yet resized: the generation seen before stays, the new one is not claimed.
    scaler["status"] = {"observedGeneration": 4}
    stale = pool_status(sized, pool, scaler, {"spec": {"replicas": 2}, "status": {"replicas": 2}})
    assert stale["observedGeneration"] == 4 and stale["readyReplicas"] == 0
    # No Deployment at all (yet): zeros, and no observedGeneration claimed for a fresh object.
    fresh = live_scaler(spec, "l40s", 3, 3, generation=1)
    assert "observedGeneration" not in pool_status(sized, pool, fresh, None)


@pytest.mark.parametrize("kind", ["UCMPool", "Deployment"])
def test_only_labelled_pool_objects_are_found(hetero: dict[str, Any], kind: str) -> None:
    spec = parse_cluster(hetero)
    obj = live_scaler(spec, "l40s", 2, 2)
    obj["kind"] = kind
    found = scalers_by_pool({("ucm.dev/v1alpha1", kind, "llama-pd-l40s"): obj})
    assert list(found) == (["l40s"] if kind == "UCMPool" else [])


def test_docs_say_who_wins() -> None:
    text = (Path(ROOT) / "docs" / "scaling.md").read_text()
    for phrase in ("kubectl scale", "HorizontalPodAutoscaler", "clusterReplicas", "re-base"):
        assert phrase in text, phrase
