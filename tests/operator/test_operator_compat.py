"""compat.check_cluster: what CEL cannot check, reported with the field path and a reason."""

from __future__ import annotations

from typing import Any

import pytest
from operator_helpers import EXAMPLES, load_example
from ucm_operator.compat import LiveStore, Problem, check_cluster
from ucm_operator.spec import parse_cluster


def problems(body: dict[str, Any], live: LiveStore | None = None) -> list[Problem]:
    return check_cluster(parse_cluster(body), live)


def fields(found: list[Problem]) -> list[tuple[str, str]]:
    return [(p.field, p.reason) for p in found]


def test_examples_are_valid() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert problems(load_example(path.name)) == [], path.name


@pytest.mark.parametrize(("where", "arg", "field"), [
    ("engine", "--block-size=32", "spec.engine.extraArgs[1]"),
    ("engine", "--kv-transfer-config", "spec.engine.extraArgs[1]"),
    ("prefill", "-tp", "spec.prefill[0].extraArgs[0]"),
    ("decode", "--served-model-name", "spec.decode[0].extraArgs[0]"),
    ("decode", "--port", "spec.decode[0].extraArgs[0]"),
])
def test_operator_owned_flags_are_refused(hetero: dict[str, Any], where: str, arg: str, field: str) -> None:
    if where == "engine":
        hetero["spec"]["engine"]["extraArgs"] = ["--enforce-eager", arg]
    else:
        hetero["spec"][where][0]["extraArgs"] = [arg, "4"]
    found = problems(hetero)
    assert (field, "OperatorOwnedFlag") in fields(found)
    assert "set by the operator" in str(found[0])


def test_pools_with_different_kv_bytes_are_incompatible(hetero: dict[str, Any]) -> None:
    hetero["spec"]["prefill"][0]["extraArgs"] = ["--kv-cache-dtype", "fp8"]
    found = problems(hetero)
    assert fields(found) == [("spec.prefill[0].extraArgs", "IncompatiblePools")]
    assert "--kv-cache-dtype is fp8 here but auto (default) in spec.decode[0] (l40s)" in found[0].message


def test_same_kv_flags_everywhere_are_compatible(hetero: dict[str, Any]) -> None:
    hetero["spec"]["engine"]["extraArgs"] = ["--kv-cache-dtype", "fp8"]
    hetero["spec"]["decode"][0]["extraArgs"] = ["--kv-cache-dtype=fp8", "--max-num-seqs", "256"]
    assert problems(hetero) == []


def test_tp_must_split_kv_heads(hetero: dict[str, Any]) -> None:
    hetero["spec"]["model"]["kvHeads"] = 6
    hetero["spec"]["prefill"][0].update(tensorParallelSize=4, gpu={"count": 4})
    assert fields(problems(hetero)) == [("spec.prefill[0].tensorParallelSize", "IncompatibleTPLayout")]
    hetero["spec"]["model"]["mla"] = True  # MLA latents are not split across ranks
    assert problems(hetero) == []
    hetero["spec"]["model"].update(mla=False, kvHeads=2)  # TP 4 > 2 heads: replicated, still shareable
    assert problems(hetero) == []


def test_pipeline_parallel_needs_gpus(hetero: dict[str, Any]) -> None:
    hetero["spec"]["prefill"][0]["extraArgs"] = ["--pipeline-parallel-size", "2"]
    assert fields(problems(hetero)) == [("spec.prefill[0].gpu.count", "NotEnoughGPUs")]


def test_rwo_store_cannot_be_shared_across_nodes(hetero: dict[str, Any]) -> None:
    hetero["spec"]["store"] = {"pvc": {"accessMode": "ReadWriteOnce", "size": "1Ti"}}
    assert fields(problems(hetero)) == [("spec.store.pvc.accessMode", "StoreNotShareable")]
    for pool in hetero["spec"]["prefill"] + hetero["spec"]["decode"]:
        pool["nodeSelector"] = {"kubernetes.io/hostname": "node-a"}
    assert problems(hetero) == []  # every pod on one node: RWO is fine
    hetero["spec"]["store"]["pvc"]["accessMode"] = "ReadWriteOncePod"
    assert fields(problems(hetero)) == [("spec.store.pvc.accessMode", "StoreNotShareable")]


def test_existing_claim_must_be_rwx(hetero: dict[str, Any]) -> None:
    hetero["spec"]["store"] = {"existingClaim": "cache"}
    assert problems(hetero) == []  # not found yet: StoreReady=False, not invalid
    assert problems(hetero, LiveStore(("ReadWriteMany",))) == []
    found = problems(hetero, LiveStore(("ReadWriteOnce",)))
    assert fields(found) == [("spec.store.existingClaim", "StoreNotShareable")]


def test_live_claim_cannot_change_immutable_fields(hetero: dict[str, Any]) -> None:
    hetero["spec"]["store"] = {"pvc": {"accessMode": "ReadWriteMany", "size": "100Gi", "storageClassName": "fast"}}
    live = LiveStore(("ReadWriteOnce",), "slow", "200Gi")
    assert sorted(fields(problems(hetero, live))) == [
        ("spec.store.pvc.accessMode", "ImmutableClaim"),
        ("spec.store.pvc.size", "ImmutableClaim"),
        ("spec.store.pvc.storageClassName", "ImmutableClaim"),
    ]
    assert problems(hetero, LiveStore(("ReadWriteMany",), "fast", "50Gi")) == []  # growing is fine


def test_decode_only_needs_decode_only_fallback(hetero: dict[str, Any]) -> None:
    hetero["spec"]["prefill"] = []
    assert fields(problems(hetero)) == [("spec.router.fallback", "NoPrefillPools")]
    hetero["spec"]["router"]["fallback"] = "decode-only"
    assert problems(hetero) == []


@pytest.mark.parametrize("spelling", [
    ["--block_size", "32"], ["--block-si=32"], ["--tensor_parallel_size=2"], ["-tp=2"],
    ["--kv-transfer-config.kv_role=kv_both"], ["--kv_transfer_config.kv_role", "kv_both"], ["--served_model_name", "x"],
])
def test_owned_flags_are_refused_in_any_spelling(hetero: dict[str, Any], spelling: list[str]) -> None:
    hetero["spec"]["decode"][0]["extraArgs"] = ["--enforce-eager", *spelling]
    assert ("spec.decode[0].extraArgs[1]", "OperatorOwnedFlag") in fields(problems(hetero))


@pytest.mark.parametrize(("prefill", "decode", "compatible"), [
    (["--kv_cache_dtype=fp8"], ["--kv-cache-dtype", "fp8"], True),
    (["-q", "awq"], ["--quantization=awq"], True),
    (["--quantization", "awq"], ["-qawq"], True),
    (["--hf-overrides", '{"a": 1, "b": 2}'], ["--hf_overrides={\"b\":2,\"a\":1}"], True),
    (["--hf-overrides", '{"a": 1, "b": 2}'], ["--hf-overrides", '{"a": 1, "b": 2}', "--hf-overrides.c=3"], False),
    (["--kv-cache-dtype=fp8", "--kv-cache-dtype", "auto"], [], True),    # the last occurrence wins
    (["--tokenizer_mode", "slow"], ["--tokenizer-mode=auto"], False),
])
def test_kv_flags_compare_effective_values(hetero: dict[str, Any], prefill: list[str], decode: list[str],
                                           compatible: bool) -> None:
    hetero["spec"]["prefill"][0]["extraArgs"] = prefill
    hetero["spec"]["decode"][0]["extraArgs"] = decode
    found = fields(problems(hetero))
    assert (found == []) == compatible, found
    if not compatible:
        assert found == [("spec.prefill[0].extraArgs", "IncompatiblePools")]


def test_command_lines_vllm_would_refuse_name_the_argument(hetero: dict[str, Any]) -> None:
    hetero["spec"]["decode"][0]["extraArgs"] = ["--enforce-eager", "--max-num-seqz", "8"]
    assert fields(problems(hetero)) == [("spec.decode[0].extraArgs[1]", "InvalidEngineArgs")]
    hetero["spec"]["decode"][0]["extraArgs"] = ["--config", "/etc/more.yaml"]
    assert ("spec.decode[0].extraArgs[0]", "UncheckableFlag") in fields(problems(hetero))
