"""The pure builders: spec -> manifests, checked field by field (no cluster needed)."""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any

import pytest
from operator_helpers import load_example
from ucm_operator.build import build_children
from ucm_operator.build_router import router_args
from ucm_operator.build_workers import kv_role, vllm_args
from ucm_operator.constants import ANNOTATION_APPLIED_HASH
from ucm_operator.meta import max_tp_size, revision, short_hash
from ucm_operator.spec import parse_cluster

LABELS = ("ucm.dev/cluster", "ucm.dev/role", "ucm.dev/revision", "app.kubernetes.io/managed-by")


def children(body: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in build_children(parse_cluster(body))}


def test_heterogeneous_children(hetero: dict[str, Any]) -> None:
    kids = children(hetero)
    assert sorted(kids) == sorted([
        ("ConfigMap", "llama-pd-ucm-config"),
        ("Deployment", "llama-pd-h100"), ("Deployment", "llama-pd-l40s"), ("Deployment", "llama-pd-router"),
        ("Service", "llama-pd-prefill"), ("Service", "llama-pd-decode"), ("Service", "llama-pd-router"),
        ("PodDisruptionBudget", "llama-pd-l40s"),  # the 2-replica pool only
        ("ServiceAccount", "llama-pd-router"), ("Role", "llama-pd-router"), ("RoleBinding", "llama-pd-router"),
        ("UCMPool", "llama-pd-h100"), ("UCMPool", "llama-pd-l40s"),  # one per pool: its /scale
    ])
    for kid in kids.values():
        meta = kid["metadata"]
        assert meta["namespace"] == "ns1"
        assert all(label in meta["labels"] for label in LABELS), kid["kind"]
        assert meta["ownerReferences"] == [{"apiVersion": "ucm.dev/v1alpha1", "kind": "UCMCluster",
                                            "name": "llama-pd", "uid": "uid-1", "controller": True}]
        assert len(meta["annotations"][ANNOTATION_APPLIED_HASH]) == 16


def test_pool_deployment(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    deploy = children(hetero)[("Deployment", "llama-pd-h100")]
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["selector"]["matchLabels"] == {
        "ucm.dev/cluster": "llama-pd", "ucm.dev/role": "prefill", "ucm.dev/pool": "h100"}
    template = deploy["spec"]["template"]
    assert template["metadata"]["labels"]["ucm.dev/revision"] == revision(spec)
    pod = template["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (container,) = pod["containers"]
    assert container["command"] == ["vllm", "serve"]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
                                      "limits": {"nvidia.com/gpu": "2"}}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["ucm-store"] == "/mnt/ucm" and mounts["dshm"] == "/dev/shm"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ucm-store"]["nfs"] == {"server": "nfs.storage.svc.cluster.local", "path": "/exports/ucm"}
    assert container["env"] == [{"name": "HF_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}}]


def test_vllm_command_line(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    args = vllm_args(spec, spec.prefill[0])
    assert args[:15] == ["meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "llama-3.1-8b",
                         "--host", "0.0.0.0", "--port", "8000", "--block-size", "16", "--dtype", "bfloat16",
                         "--max-model-len", "32768", "--tensor-parallel-size", "2"]
    assert args[15:17] == ["--revision", "main"]
    config = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert config == {
        "kv_connector": "UCMConnector", "kv_connector_module_path": "ucm.connector", "kv_role": "kv_producer",
        "kv_connector_extra_config": {"store_path": "/mnt/ucm", "model_id": "meta-llama/Llama-3.1-8B-Instruct",
                                      "model_revision": "main", "durability": "none",
                                      "capacity_bytes": 500 * 2**30, "max_tp_size": 2},
    }
    assert args[-2:] == ["--gpu-memory-utilization", "0.90"]  # engine.extraArgs last
    assert kv_role(spec, spec.decode[0]) == "kv_consumer"


def test_connector_accepts_the_extra_config(hetero: dict[str, Any]) -> None:
    """The connector's own validator (ucm.connector.config) accepts what the operator writes."""
    config_module = pytest.importorskip("ucm.connector.config")
    spec = parse_cluster(hetero)
    extra = json.loads(vllm_args(spec, spec.decode[0])[-3])["kv_connector_extra_config"]
    parsed = config_module.parse_extra_config(extra, default_model_id=spec.model.served_name)
    assert parsed.store_path == "/mnt/ucm" and parsed.max_tp_size == 2


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "expected"), [
    (2, 1, 2), (1, 1, 1), (1, 4, 4), (8, 2, 8), (3, 1, 4), (16, 1, 8),
])
def test_every_pool_gets_the_largest_tp_size_as_max_tp_size(
    hetero: dict[str, Any], prefill_tp: int, decode_tp: int, expected: int
) -> None:
    """All pools of a cluster agree on the connector's head grouping: the largest TP size of any
    pool (prefill or decode), rounded up to a value the connector accepts (1, 2, 4, 8)."""
    body = copy.deepcopy(hetero)
    body["spec"]["prefill"][0]["tensorParallelSize"] = prefill_tp
    body["spec"]["decode"][0]["tensorParallelSize"] = decode_tp
    body["spec"]["decode"].append({**copy.deepcopy(body["spec"]["decode"][0]), "name": "small", "tensorParallelSize": 1})
    spec = parse_cluster(body)
    assert max_tp_size(spec) == expected
    for pool in spec.pools:
        args = vllm_args(spec, pool)
        extra = json.loads(args[args.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
        assert extra["max_tp_size"] == expected, pool.name


def test_decode_only_runs_kv_both_and_mounts_model_claim() -> None:
    body = load_example("ucmcluster-decode-only.yaml")
    spec = parse_cluster(body)
    assert kv_role(spec, spec.decode[0]) == "kv_both"
    kids = children(body)
    assert ("Service", "chat-cache-prefill") not in kids
    pod = kids[("Deployment", "chat-cache-l40s")]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[0] == "/models/llama-3.1-8b-instruct" and "--revision" not in args
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["ucm-store"]["persistentVolumeClaim"] == {"claimName": "ucm-kv-cache"}
    assert "--fallback" in router_args(spec) and router_args(spec)[-1] == "decode-only"


def test_role_services_are_headless_and_select_by_role(hetero: dict[str, Any]) -> None:
    svc = children(hetero)[("Service", "llama-pd-decode")]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"ucm.dev/cluster": "llama-pd", "ucm.dev/role": "decode"}
    assert svc["metadata"]["labels"]["ucm.dev/role"] == "decode"


def test_router(hetero: dict[str, Any]) -> None:
    kids = children(hetero)
    deploy = kids[("Deployment", "llama-pd-router")]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["ucm", "router", "serve"]
    assert container["args"] == ["--host", "0.0.0.0", "--port", "8000", "--model", "llama-3.1-8b",
                                 "--discovery", "kubernetes", "--namespace", "ns1", "--cluster", "llama-pd",
                                 "--policy", "prefix-affinity", "--fallback", "fail"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "llama-pd-router"
    assert "ucm.dev/revision" not in deploy["spec"]["template"]["metadata"]["labels"]
    role = kids[("Role", "llama-pd-router")]
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    ]
    binding = kids[("RoleBinding", "llama-pd-router")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llama-pd-router", "namespace": "ns1"}]
    svc = kids[("Service", "llama-pd-router")]
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["port"] == 8000


def test_router_args_parse_with_the_router_cli(hetero: dict[str, Any]) -> None:
    """The router's own parser (ucm router serve) accepts the operator's command line."""
    cli = pytest.importorskip("ucm.cli")
    spec = parse_cluster(hetero)
    argv = ["router", "serve", *router_args(spec)]
    args = cli.build_parser(argv).parse_args(argv)
    assert (args.namespace, args.cluster, args.model, args.policy) == ("ns1", "llama-pd", "llama-3.1-8b", "prefix-affinity")


def test_pvc_follows_reclaim_policy() -> None:
    body = load_example("ucmcluster-pvc.yaml")
    claim = children(body)[("PersistentVolumeClaim", "qwen-pd-store")]
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}},
                             "storageClassName": "nfs-client"}
    assert "ownerReferences" not in claim["metadata"]  # Retain: outlives the cluster
    body["spec"]["store"]["reclaimPolicy"] = "Delete"
    claim = children(body)[("PersistentVolumeClaim", "qwen-pd-store")]
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pod = children(body)[("Deployment", "qwen-pd-decode")]["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {"name": "ucm-store", "persistentVolumeClaim": {"claimName": "qwen-pd-store"}}


def test_builders_are_deterministic(hetero: dict[str, Any]) -> None:
    assert build_children(parse_cluster(hetero)) == build_children(parse_cluster(copy.deepcopy(hetero)))
    assert short_hash({"a": 1, "b": [1, 2]}) == short_hash({"b": [1, 2], "a": 1})


def _changed(hetero: dict[str, Any], mutate: Any) -> tuple[bool, set[tuple[str, str]]]:
    """(did the revision change, which children changed) after `mutate`."""
    before_rev, before = revision(parse_cluster(hetero)), children(hetero)
    after_body = copy.deepcopy(hetero)
    mutate(after_body["spec"])
    after_rev, after = revision(parse_cluster(after_body)), children(after_body)
    changed = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    return before_rev != after_rev, changed


def test_engine_change_changes_revision_and_rolls_every_pool(hetero: dict[str, Any]) -> None:
    rev_changed, changed = _changed(hetero, lambda s: s["engine"]["extraArgs"].append("--enforce-eager"))
    assert rev_changed
    assert {("Deployment", "llama-pd-h100"), ("Deployment", "llama-pd-l40s")} <= changed
    for mutate in (lambda s: s["engine"].update(blockSize=32), lambda s: s["model"].update(revision="v2"),
                   lambda s: s["engine"].update(image="other:1"), lambda s: s["store"].update(capacity="1Ti")):
        assert _changed(hetero, mutate)[0]


def test_pool_changes_keep_revision_and_touch_only_that_pool(hetero: dict[str, Any]) -> None:
    rev_changed, changed = _changed(hetero, lambda s: s["decode"][0].update(replicas=5))
    assert not rev_changed
    assert changed == {("Deployment", "llama-pd-l40s")}
    rev_changed, changed = _changed(hetero, lambda s: s["prefill"][0].update(extraArgs=["--max-num-seqs", "8"]))
    assert not rev_changed and changed == {("Deployment", "llama-pd-h100")}


def test_tp_change_that_regroups_kv_heads_changes_revision(hetero: dict[str, Any]) -> None:
    """The largest TP sets every pool's max_tp_size (the KV-head grouping in the store): pods of
    the old and new grouping share no blocks, so the router must not pair them."""
    rev_changed, changed = _changed(hetero, lambda s: s["prefill"][0].update(tensorParallelSize=4))
    assert rev_changed
    assert {("Deployment", "llama-pd-h100"), ("Deployment", "llama-pd-l40s")} <= changed
    # A TP change within the same grouping (decode 1 -> 2, prefill already 2) keeps the revision.
    assert not _changed(hetero, lambda s: s["decode"][0].update(tensorParallelSize=2))[0]


def test_removing_a_pool_removes_its_children(hetero: dict[str, Any]) -> None:
    hetero["spec"]["decode"].append({"name": "h100-decode", "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}})
    _, changed = _changed(hetero, lambda s: s["decode"].pop())
    assert ("Deployment", "llama-pd-h100-decode") in changed


def test_names_are_unique_per_kind(hetero: dict[str, Any]) -> None:
    kinds = Counter((c["kind"], c["metadata"]["name"]) for c in build_children(parse_cluster(hetero)))
    assert max(kinds.values()) == 1


def test_workers_drain_before_they_stop(hetero: dict[str, Any]) -> None:
    """Scale-in and rollouts: a pause before SIGTERM (the router drops the terminating endpoint
    meanwhile), then vLLM finishes its requests instead of aborting them (its default), inside the
    grace period; a user's own --shutdown-timeout comes later on the command line and wins."""
    from ucm_operator.build_workers import DRAIN_SECONDS, PRESTOP_SECONDS

    spec = parse_cluster(hetero)
    for name in ("llama-pd-h100", "llama-pd-l40s"):
        pod = children(hetero)[("Deployment", name)]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}}
        args = container["args"]
        assert args[args.index("--shutdown-timeout") + 1] == str(DRAIN_SECONDS)
        assert pod["terminationGracePeriodSeconds"] > PRESTOP_SECONDS + DRAIN_SECONDS
    hetero["spec"]["engine"]["extraArgs"] += ["--shutdown-timeout", "5"]
    args = vllm_args(parse_cluster(hetero), spec.decode[0])
    assert args.index("--shutdown-timeout") < len(args) - 2 and args[-2:] == ["--shutdown-timeout", "5"]
