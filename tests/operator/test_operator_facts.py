"""facts.py: which nodes a pool can reach (selector, gpu.product, required affinity, taints), and
the refusal of pools asking for more GPUs per pod than any of them has; compat's claim and mount
checks. The watch that re-checks on node changes runs in e2e/test_operator_admission.py."""

from __future__ import annotations

from typing import Any

from ucm_operator.compat import LiveStore, check_cluster
from ucm_operator.facts import NodeFacts, node_problems, reaches, required_terms
from ucm_operator.spec import parse_cluster

L40S, H100 = "NVIDIA-L40S", "NVIDIA-H100-80GB-HBM3"


def node(name: str, product: str | None, gpus: int, taints: tuple[dict[str, str], ...] = (),
         **labels: str) -> NodeFacts:
    meta_labels = {"kubernetes.io/hostname": name, **labels}
    if product:
        meta_labels["nvidia.com/gpu.product"] = product
    return NodeFacts.of({"metadata": {"name": name, "labels": meta_labels}, "spec": {"taints": list(taints)},
                         "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}})


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODES = [node("h100-0", H100, 8, (GPU_TAINT,)), node("l40s-0", L40S, 4, (GPU_TAINT,), zone="a"),
         node("l40s-1", L40S, 2, (GPU_TAINT,), zone="b"), node("cpu-0", None, 0)]


def fields(body: dict[str, Any], nodes: list[NodeFacts] | None = None, live: LiveStore | None = None) -> list[str]:
    spec = parse_cluster(body)
    return [p.field for p in check_cluster(spec, live) + node_problems(spec, NODES if nodes is None else nodes)]


def test_gpus_per_pod_must_fit_a_reachable_node(hetero: dict[str, Any]) -> None:
    assert fields(hetero) == []
    hetero["spec"]["decode"][0]["gpu"]["count"] = 5        # L40S nodes have at most 4
    assert fields(hetero) == ["spec.decode[0].gpu.count"]
    hetero["spec"]["decode"][0]["gpu"]["count"] = 4
    hetero["spec"]["decode"][0]["nodeSelector"] = {"zone": "b"}   # ... and the zone-b one 2
    assert fields(hetero) == ["spec.decode[0].gpu.count"]
    assert fields(hetero, nodes=[]) == []                   # nodes unknown or none reachable: not refused


def test_reach_follows_affinity_and_taints(hetero: dict[str, Any]) -> None:
    pool = parse_cluster(hetero).decode[0]
    assert [n.name for n in NODES if reaches(pool, n)] == ["l40s-0", "l40s-1"]
    hetero["spec"]["decode"][0].pop("gpu")
    hetero["spec"]["decode"][0]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
                              {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["h100-0"]}]}]}}}
    pool = parse_cluster(hetero).decode[0]
    assert [n.name for n in NODES if reaches(pool, n, required_terms(pool) or [])] == ["h100-0", "l40s-1", "cpu-0"]
    tainted = node("x", None, 16, ({"key": "dedicated", "value": "infer", "effect": "NoExecute"},))
    assert not reaches(pool, tainted)
    hetero["spec"]["decode"][0]["tolerations"] = [{"key": "dedicated", "operator": "Equal", "value": "infer"}]
    assert reaches(parse_cluster(hetero).decode[0], tainted)
    hetero["spec"]["decode"][0]["affinity"] = {"nodeAffinity": "anywhere"}   # the dry run names this one
    assert required_terms(parse_cluster(hetero).decode[0]) is None


def test_existing_claim_must_hold_the_capacity_and_serve_every_pod(hetero: dict[str, Any]) -> None:
    hetero["spec"]["store"] = {"existingClaim": "cache", "capacity": "20Gi"}
    assert fields(hetero, live=LiveStore(("ReadWriteMany",), None, "30Gi")) == []
    assert fields(hetero, live=LiveStore(("ReadWriteMany",), None, "10Gi")) == ["spec.store.capacity"]
    assert fields(hetero, live=LiveStore(("ReadOnlyMany",), None, "30Gi")) == ["spec.store.existingClaim"]
    assert fields(hetero, live=LiveStore(("ReadWriteOncePod",), None, "30Gi")) == ["spec.store.existingClaim"]


def test_store_mount_must_not_collide_with_another_mount(hetero: dict[str, Any]) -> None:
    for path, collides in (("/etc/ucm", True), ("/etc/ucm/kv", True), ("/etc", True), ("/", True),
                           ("/dev/shm/x", True), ("/mnt/ucm", False), ("/etc/ucmx", False), ("/models", False)):
        hetero["spec"]["store"]["mountPath"] = path
        assert (set(fields(hetero)) == {"spec.store.mountPath"}) == collides, path
    hetero["spec"]["model"]["source"] = "pvc://weights/llama"   # now /models is mounted too
    assert fields(hetero) == ["spec.store.mountPath"]
