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
from ucm_operator.kube import KubeError
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


# --- a whole pass against an in-memory API (writes counted) -----------------------------------


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


class FakeKube:
    """Just enough of `Kube` for `Reconciler.reconcile`: server-side apply as a deep merge (each
    write moves the generation), lists by kind, status patches, events."""

    def __init__(self, cluster: dict[str, Any], serve_pools: bool = True) -> None:
        self.cluster = copy.deepcopy(cluster)
        self.serve_pools = serve_pools
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []   # (what, kind, name)

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        if kind == "UCMCluster":
            return copy.deepcopy(self.cluster)
        found = self.objects.get((kind, name))
        return copy.deepcopy(found) if found else None

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]:
        if kind == "Node":
            raise KubeError(403, "Forbidden", "no nodes here")   # the GPU check is skipped
        if kind == "UCMPool" and not self.serve_pools:
            raise KubeError(404, "NotFound", "the server could not find the requested resource")
        return [copy.deepcopy(o) for (k, _), o in self.objects.items() if k == kind]

    def apply(self, manifest: dict[str, Any], *, dry_run: bool = False, manager: str = "ucm-operator") -> dict[str, Any]:
        key = (manifest["kind"], manifest["metadata"]["name"])
        current = self.objects.get(key) or {"metadata": {"uid": f"uid-{len(self.objects)}", "generation": 0}}
        merged = _merge(current, manifest)
        if dry_run:
            return merged
        merged["metadata"]["generation"] = current["metadata"]["generation"] + 1
        self.objects[key] = merged
        self.writes.append((f"apply/{manager}", *key))
        return copy.deepcopy(merged)

    def scale(self, name: str, replicas: int) -> None:
        """What `kubectl scale ucmpool` does to the object."""
        obj = self.objects[("UCMPool", name)]
        obj["spec"]["replicas"] = replicas
        obj["metadata"]["generation"] += 1

    def patch_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        target = self.cluster if obj["kind"] == "UCMCluster" else self.objects[(obj["kind"], obj["metadata"]["name"])]
        target["status"] = copy.deepcopy(status)
        self.writes.append(("status", obj["kind"], obj["metadata"]["name"]))
        return copy.deepcopy(target)

    def event(self, obj: dict[str, Any], **kwargs: Any) -> None:
        self.writes.append(("event", obj["kind"], kwargs["reason"]))

    def delete(self, obj: dict[str, Any]) -> None:
        self.objects.pop((obj["kind"], obj["metadata"]["name"]))
        self.writes.append(("delete", obj["kind"], obj["metadata"]["name"]))


def replicas(kube: FakeKube, kind: str, name: str) -> Any:
    return kube.objects[(kind, name)]["spec"].get("replicas")


def test_a_pass_creates_and_rebases_pools_then_follows_scale_with_one_write(hetero: dict[str, Any]) -> None:
    kube = FakeKube(hetero)
    reconciler = Reconciler(kube)  # type: ignore[arg-type]
    first = reconciler.reconcile("ns1", "llama-pd")
    assert first.errors == []
    assert [w for w in kube.writes if w[1] == "UCMPool"] == [
        ("apply/ucm-operator", "UCMPool", "llama-pd-h100"), ("apply/ucm-operator", "UCMPool", "llama-pd-l40s"),
        ("apply/ucm-operator-rebase", "UCMPool", "llama-pd-h100"), ("apply/ucm-operator-rebase", "UCMPool", "llama-pd-l40s"),
        ("status", "UCMPool", "llama-pd-h100"), ("status", "UCMPool", "llama-pd-l40s")]
    assert replicas(kube, "UCMPool", "llama-pd-l40s") == 2 and replicas(kube, "Deployment", "llama-pd-l40s") == 2
    # The next pass only updates the status (Progressing: applied -> rolling out); then a resync
    # of the unchanged world writes nothing.
    reconciler.reconcile("ns1", "llama-pd")
    kube.writes.clear()
    assert reconciler.reconcile("ns1", "llama-pd").writes == 0 and kube.writes == []
    # /scale to 5: exactly one write by the operator, the Deployment's; then nothing again.
    kube.scale("llama-pd-l40s", 5)
    second = reconciler.reconcile("ns1", "llama-pd")
    assert [w for w in kube.writes if w[0] != "status"] == [("apply/ucm-operator", "Deployment", "llama-pd-l40s")]
    assert second.applied == 1 and replicas(kube, "Deployment", "llama-pd-l40s") == 5
    assert kube.cluster["status"]["decode"] == "0/5"
    kube.writes.clear()
    reconciler.reconcile("ns1", "llama-pd")
    assert [w for w in kube.writes if w[0] != "status"] == []
    # A fresh operator (no memory) keeps the /scale size too.
    kube.writes.clear()
    assert Reconciler(kube).reconcile("ns1", "llama-pd").applied == 0  # type: ignore[arg-type]
    assert replicas(kube, "Deployment", "llama-pd-l40s") == 5


def test_without_the_pool_crd_the_rest_is_applied_and_degraded_says_what_to_do(hetero: dict[str, Any]) -> None:
    kube = FakeKube(hetero, serve_pools=False)
    outcome = Reconciler(kube).reconcile("ns1", "llama-pd")  # type: ignore[arg-type]
    kinds = {kind for _, kind, _ in kube.writes}
    assert "UCMPool" not in kinds and {"Deployment", "Service", "ConfigMap"} <= kinds
    assert replicas(kube, "Deployment", "llama-pd-l40s") == 2          # the UCMCluster's value, as before
    (error,) = outcome.errors
    assert "kubectl apply -f crds/" in error
    degraded = next(c for c in kube.cluster["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed") and "ucmpools.ucm.dev" in degraded["message"]
