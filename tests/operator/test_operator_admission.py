"""admission.py's map from a child's field path back to the UCMCluster field behind it. The API
server's own verdicts are exercised on the real control plane (e2e/test_operator_admission.py);
these tests pin the path grammar and check that the map cannot rot: every rule points at a part
of the built child that exists and holds what the user wrote."""

from __future__ import annotations

from typing import Any

from ucm_operator.admission import Origins, origins, parse_path, refusal_problems, render
from ucm_operator.build import build_children
from ucm_operator.kube import KubeError
from ucm_operator.spec import parse_cluster


def _at(obj: Any, path: tuple[str | int, ...]) -> Any:
    for seg in path:
        obj = obj[seg]
    return obj


def test_both_path_grammars() -> None:
    manifest = {"spec": {"containers": [{"name": "a"}, {"name": "vllm", "volumeMounts": [{"mountPath": "/x"}]}]}}
    assert parse_path("spec.containers[1].resources.requests[nvidia.com/gpu]", manifest) == (
        "spec", "containers", 1, "resources", "requests", "nvidia.com/gpu")
    # server-side apply names list items by their keys; they resolve to indices in what was sent
    assert parse_path('.spec.containers[name="vllm"].volumeMounts[mountPath="/x"]', manifest) == (
        "spec", "containers", 1, "volumeMounts", 0)
    assert render(("resources", "requests", "memory")) == ".resources.requests.memory"
    assert render(("requests", "nvidia.com/gpu", 0)) == ".requests[nvidia.com/gpu][0]"


def test_every_rule_points_at_what_the_user_wrote(hetero: dict[str, Any]) -> None:
    decode = hetero["spec"]["decode"][0]
    decode.update(tolerations=[{"key": "a", "operator": "Exists"}], affinity={"nodeAffinity": {}},
                  nodeSelector={"zone": "a"}, extraArgs=["--enforce-eager"], image="img:1",
                  resources={"requests": {"cpu": "1"}})
    hetero["spec"]["engine"]["extraArgs"] = ["--max-num-seqs", "8"]
    hetero["spec"]["engine"]["env"] = [{"name": "A", "value": "b"}]
    spec = parse_cluster(hetero)
    children = {(c["kind"], c["metadata"]["name"]): c for c in build_children(spec)}
    where = origins(spec)
    assert set(children) <= set(where), set(children) - set(where)
    deployment = children[("Deployment", "llama-pd-l40s")]
    rules = {r.field: r.prefix for r in where[("Deployment", "llama-pd-l40s")].rules}
    expected = {
        "spec.decode[0].tolerations[0]": decode["tolerations"][0],
        "spec.decode[0].affinity": decode["affinity"],
        "spec.decode[0].image": "img:1",
        "spec.engine.env": [{"name": "A", "value": "b"}],
        "spec.engine.extraArgs[0]": "--max-num-seqs",
        "spec.engine.extraArgs[1]": "8",
        "spec.decode[0].extraArgs[0]": "--enforce-eager",
        "spec.decode[0].gpu.product": "NVIDIA-L40S",
        "spec.decode[0].replicas": decode["replicas"],
        "spec.store.mountPath": [{"name": "ucm-store", "mountPath": "/mnt/ucm"},
                                 {"name": "ucm-config", "mountPath": "/etc/ucm", "readOnly": True},
                                 {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    for field, value in expected.items():
        assert _at(deployment, rules[field]) == value, field
    assert _at(deployment, rules["spec.decode[0].resources"])["requests"]["cpu"] == "1"
    router = children[("Deployment", "llama-pd-router")]
    router_rules = {r.field: r.prefix for r in where[("Deployment", "llama-pd-router")].rules}
    assert _at(router, router_rules["spec.router.resources"]) == router["spec"]["template"]["spec"]["containers"][0][
        "resources"]


def test_refusal_names_the_user_field(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    deployment = next(c for c in build_children(spec) if c["metadata"]["name"] == "llama-pd-l40s")
    where = origins(spec)[("Deployment", "llama-pd-l40s")]
    invalid = KubeError(422, "Invalid", "is invalid", ["FieldValueInvalid"] * 2, [
        ("spec.template.spec.containers[0].resources.requests[memory]", 'Invalid value: "-1": must be >= 0'),
        ("spec.template.spec.containers[0].resources.limits[nvidia.com/gpu]", "Invalid value"),
    ])
    assert [p.field for p in refusal_problems(deployment, invalid, where)] == [
        "spec.decode[0].resources.requests.memory", "spec.decode[0].gpu.count"]
    typed = KubeError(500, "InternalError", "failed to create typed patch object (ns/x; apps/v1, Kind=Deployment): "
                      '.spec.template.spec.containers[name="vllm"].volumeMounts: duplicate entries for key '
                      '[mountPath="/dev/shm"]')
    (problem,) = refusal_problems(deployment, typed, where)
    assert problem.field == "spec.store.mountPath" and "duplicate entries" in problem.message
    # A path no rule covers is charged to the pool as a whole, and says where in the child.
    (other,) = refusal_problems(deployment, KubeError(422, "Invalid", "x", [], [
        ("spec.template.spec.terminationGracePeriodSeconds", "bad")]), where)
    assert other.field == "spec.decode[0]" and "terminationGracePeriodSeconds" in other.message
    assert Origins("spec").field_of(("a",)) == "spec"
    nfs = parse_path("spec.template.spec.volumes[0].nfs.server", deployment)
    assert where.field_of(nfs) == "spec.store.nfs.server"
