"""spec.parse_cluster: CRD defaults applied, structural mistakes named by field."""

from __future__ import annotations

from typing import Any

import pytest
from operator_helpers import EXAMPLES, load_example
from ucm_operator.quantity import QuantityError, parse_bytes
from ucm_operator.spec import SpecError, parse_cluster


def test_heterogeneous_example_parses(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(hetero)
    assert spec.name == "llama-pd" and spec.namespace == "ns1" and spec.uid == "uid-1"
    assert [(p.role, p.name, p.tensor_parallel_size, p.gpu_count, p.gpu_product) for p in spec.pools] == [
        ("prefill", "h100", 2, 2, "NVIDIA-H100-80GB-HBM3"),
        ("decode", "l40s", 1, 1, "NVIDIA-L40S"),
    ]
    assert spec.model.hf_repo == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.model.model_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.store.kind == "nfs" and spec.disaggregated


def test_every_example_parses() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        parse_cluster(load_example(path.name))


def test_defaults_match_the_crd() -> None:
    spec = parse_cluster({
        "metadata": {"name": "x"},
        "spec": {"model": {"servedName": "m", "source": "hf://o/m"}, "store": {"pvc": {}},
                 "decode": [{"name": "d"}]},
    })
    assert spec.namespace == "default" and spec.model.revision == "main"
    assert (spec.engine.block_size, spec.engine.dtype, spec.engine.max_model_len) == (16, "auto", None)
    assert (spec.store.pvc_size, spec.store.pvc_access_mode, spec.store.reclaim_policy) == ("100Gi", "ReadWriteMany", "Retain")
    assert (spec.store.mount_path, spec.store.durability) == ("/mnt/ucm", "none")
    pool = spec.decode[0]
    assert (pool.replicas, pool.tensor_parallel_size, pool.gpu_count) == (1, 1, 1)
    assert (spec.router.replicas, spec.router.policy, spec.router.fallback) == (1, "prefix-affinity", "fail")
    assert (spec.router.service_type, spec.router.port) == ("ClusterIP", 8000)
    assert not spec.prefill


def test_gpu_count_defaults_to_tp() -> None:
    body = load_example()
    del body["spec"]["prefill"][0]["gpu"]["count"]
    assert parse_cluster(body).prefill[0].gpu_count == 2


def test_pvc_model_source() -> None:
    spec = parse_cluster(load_example("ucmcluster-decode-only.yaml"))
    assert spec.model.pvc_claim == ("models", "llama-3.1-8b-instruct")
    assert spec.model.hf_repo is None
    assert spec.model.model_id == "llama-3.1-8b"  # never a path: two mounts of one model share blocks


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s["model"].pop("servedName"), "spec.model.servedName"),
        (lambda s: s["model"].update(source="s3://bucket/model"), "spec.model.source"),
        (lambda s: s["store"].update(existingClaim="x"), "spec.store"),
        (lambda s: s.update(store={}), "spec.store"),
        (lambda s: s.update(decode=[]), "spec.decode"),
        (lambda s: s["decode"][0].update(replicas="two"), "spec.decode[0].replicas"),
        (lambda s: s["decode"][0].update(replicas=True), "spec.decode[0].replicas"),
        (lambda s: s["prefill"][0].pop("name"), "spec.prefill[0].name"),
        (lambda s: s["engine"].update(extraArgs=["--x", 3]), "spec.engine.extraArgs[1]"),
        (lambda s: s["engine"].update(env=["A=B"]), "spec.engine.env[0]"),
        (lambda s: s["store"]["nfs"].pop("server"), "spec.store.nfs.server"),
        (lambda s: s.update(prefill="h100"), "spec.prefill"),
    ],
)
def test_structural_errors_name_the_field(hetero: dict[str, Any], mutate: Any, field: str) -> None:
    mutate(hetero["spec"])
    with pytest.raises(SpecError) as info:
        parse_cluster(hetero)
    assert info.value.field == field, str(info.value)


def test_missing_spec_and_name() -> None:
    with pytest.raises(SpecError, match=r"^spec: required"):
        parse_cluster({"metadata": {"name": "x"}})
    with pytest.raises(SpecError, match=r"^metadata\.name"):
        parse_cluster({"metadata": {}, "spec": {}})


@pytest.mark.parametrize(("text", "value"), [
    ("500Gi", 500 * 2**30), ("1T", 10**12), ("1.5Gi", 3 * 2**29), ("2e9", 2 * 10**9), ("1024", 1024),
    ("1500m", 2), (7, 7),
])
def test_quantities(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["ten gigs", "1GB", "", "-1Gi"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(QuantityError):
        parse_bytes(text)


def test_sparse_settings_reach_every_pools_connector_config(hetero: dict[str, Any]) -> None:
    from ucm_operator.meta import connector_extra_config, revision

    plain = parse_cluster(hetero)
    hetero["spec"]["sparse"] = {"keepRatio": 0.2, "offload": True, "retrievalStride": 2}
    spec = parse_cluster(hetero)
    extra = connector_extra_config(spec)
    # only what the user set, in the connector's key names: the algorithm's own defaults apply
    assert extra["ucm_sparse_config"] == {"name": "block_retrieval", "keep_ratio": 0.2, "offload": True,
                                          "retrieval_stride": 2}
    assert "ucm_sparse_config" not in connector_extra_config(plain)
    assert revision(spec) != revision(plain)  # turning it on rolls every pool


@pytest.mark.parametrize(("sparse", "field"), [
    ({"keepRatio": "a quarter"}, "spec.sparse.keepRatio"),
    ({"keepRatio": True}, "spec.sparse.keepRatio"),
    ({"offload": 1}, "spec.sparse.offload"),
    ({"minBlocks": 2.5}, "spec.sparse.minBlocks"),
    ({"keepRatoi": 0.25}, "spec.sparse.keepRatoi"),
])
def test_sparse_errors_name_the_field(hetero: dict[str, Any], sparse: dict[str, Any], field: str) -> None:
    hetero["spec"]["sparse"] = sparse
    with pytest.raises(SpecError) as err:
        parse_cluster(hetero)
    assert err.value.field == field
