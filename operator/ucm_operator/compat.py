"""The checks the CRD's CEL rules cannot express, because they need vLLM argument parsing, the
model's geometry, or live objects: are the pools PD-compatible (would every pool produce and read
the same KV blocks), can the store be shared by every pod, can the live claim become what the spec
asks. A spec that fails any of them is reported as Valid=False and changes nothing that runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .quantity import QuantityError, parse_bytes
from .spec import ClusterSpec, PoolSpec

# vLLM flags the operator sets from a spec field; setting them in extraArgs would either duplicate
# the flag (vLLM keeps the last one, silently overriding the field) or break the PD hand-off.
OWNED_FLAGS: dict[str, str] = {
    "--model": "spec.model.source",
    "--served-model-name": "spec.model.servedName",
    "--revision": "spec.model.revision",
    "--host": "the operator (0.0.0.0)",
    "--port": "the operator (8000)",
    "--block-size": "spec.engine.blockSize",
    "--dtype": "spec.engine.dtype",
    "--max-model-len": "spec.engine.maxModelLen",
    "--tensor-parallel-size": "the pool's tensorParallelSize",
    "-tp": "the pool's tensorParallelSize",
    "--kv-transfer-config": "the operator (UCM connector in the pool's role)",
    "--kv-connector": "the operator (UCM connector in the pool's role)",
    "--data-parallel-size": "the pool's replicas",
    "-dp": "the pool's replicas",
}
# Flags that change the bytes of a KV block (or the tokens that are hashed): every pool must agree,
# or a block written by prefill is not the block decode looks for.
KV_FLAGS: tuple[str, ...] = (
    "--kv-cache-dtype",
    "--quantization",
    "-q",
    "--hf-overrides",
    "--calculate-kv-scales",
    "--tokenizer",
    "--tokenizer-revision",
    "--tokenizer-mode",
    "--code-revision",
)
_ALIASES = {"-q": "--quantization", "-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size",
            "-dp": "--data-parallel-size"}


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why a spec is not valid: the field path, a CamelCase reason and a sentence for humans."""

    field: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclasses.dataclass(frozen=True)
class LiveStore:
    """What the operator read about the store's claim before validating (None: not found)."""

    claim_access_modes: tuple[str, ...] | None = None
    claim_storage_class: str | None = None
    claim_size: str | None = None


def parse_flags(args: Sequence[str]) -> dict[str, tuple[int, str]]:
    """vLLM flags in `args` -> (index of the flag, value); `--x=v` and `--x v`; a flag followed by
    another flag (or nothing) is a boolean "true". The last occurrence wins, as in argparse."""
    flags: dict[str, tuple[int, str]] = {}
    i = 0
    while i < len(args):
        start, arg = i, args[i]
        if arg.startswith("-") and not _is_number(arg):
            name, eq, value = arg.partition("=")
            name = _ALIASES.get(name, name)
            if not eq:
                if i + 1 < len(args) and (not args[i + 1].startswith("-") or _is_number(args[i + 1])):
                    value = args[i + 1]
                    i += 1
                else:
                    value = "true"
            flags[name] = (start, value)
        i += 1
    return flags


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _owned_flag_problems(args: Sequence[str], field: str) -> list[Problem]:
    problems = []
    for i, arg in enumerate(args):
        name = arg.partition("=")[0]
        if name in OWNED_FLAGS or _ALIASES.get(name) in OWNED_FLAGS:
            source = OWNED_FLAGS.get(name) or OWNED_FLAGS[_ALIASES[name]]
            problems.append(Problem(f"{field}.extraArgs[{i}]", "OperatorOwnedFlag",
                                    f"{name} is set by the operator from {source}; remove it from extraArgs"))
    return problems


def _kv_settings(spec: ClusterSpec, pool: PoolSpec) -> dict[str, str]:
    flags = parse_flags(spec.engine.extra_args + pool.extra_args)
    return {name: flags[name][1] if name in flags else "(default)" for name in sorted(set(_ALIASES.get(f, f) for f in KV_FLAGS))}


def _pool_problems(spec: ClusterSpec) -> list[Problem]:
    problems: list[Problem] = []
    problems += _owned_flag_problems(spec.engine.extra_args, "spec.engine")
    for pool in spec.pools:
        problems += _owned_flag_problems(pool.extra_args, pool.field)
        flags = parse_flags(spec.engine.extra_args + pool.extra_args)
        pp_text = flags.get("--pipeline-parallel-size", (0, "1"))[1]
        pp = int(pp_text) if pp_text.isdigit() else 1
        if pool.gpu_count < pool.tensor_parallel_size * pp:
            problems.append(Problem(f"{pool.field}.gpu.count", "NotEnoughGPUs",
                                    f"{pool.gpu_count} GPUs per pod cannot run tensorParallelSize "
                                    f"{pool.tensor_parallel_size} x pipeline-parallel-size {pp}"))
        tp = pool.tensor_parallel_size
        heads = spec.model.kv_heads
        if heads and not spec.model.mla and (heads % tp if tp <= heads else tp % heads):
            problems.append(Problem(f"{pool.field}.tensorParallelSize", "IncompatibleTPLayout",
                                    f"{heads} KV heads (spec.model.kvHeads) cannot be split evenly over {tp} "
                                    "ranks, so this pool's head groups would not match the stored ones"))
    # PD compatibility: every pool must hash and lay out KV identically. Compare each pool with the
    # first decode pool (decode always exists) and name the pool that differs.
    reference = spec.decode[0]
    ref_settings = _kv_settings(spec, reference)
    for pool in spec.pools:
        if pool is reference:
            continue
        settings = _kv_settings(spec, pool)
        for name, value in settings.items():
            if value != ref_settings[name]:
                problems.append(Problem(f"{pool.field}.extraArgs", "IncompatiblePools",
                                        f"{name} is {value} here but {ref_settings[name]} in {reference.field} "
                                        f"({reference.name}): pools must produce identical KV blocks"))
    return problems


def _may_spread(spec: ClusterSpec) -> bool:
    """Can two worker pods land on different nodes? Yes unless there is at most one pod, or every
    pool pins the same node by hostname."""
    if sum(pool.replicas for pool in spec.pools) <= 1:
        return False
    hosts = {pool.node_selector.get("kubernetes.io/hostname") for pool in spec.pools}
    return len(hosts) != 1 or None in hosts


def _store_problems(spec: ClusterSpec, live: LiveStore) -> list[Problem]:
    store = spec.store
    problems: list[Problem] = []
    pods = sum(pool.replicas for pool in spec.pools)
    if store.kind == "pvc":
        mode = store.pvc_access_mode
        if (mode == "ReadWriteOnce" and _may_spread(spec)) or (mode == "ReadWriteOncePod" and pods > 1):
            problems.append(Problem("spec.store.pvc.accessMode", "StoreNotShareable",
                                    f"{mode} cannot be mounted by {pods} worker pods that may run on different "
                                    "nodes; use ReadWriteMany (or nfs), or pin every pool to one node"))
        if live.claim_access_modes is not None:
            if mode not in live.claim_access_modes:
                problems.append(Problem("spec.store.pvc.accessMode", "ImmutableClaim",
                                        f"the existing claim has accessModes {list(live.claim_access_modes)}; a "
                                        "claim's access mode cannot change (delete it or use a new cluster name)"))
            if (store.pvc_storage_class or None) != (live.claim_storage_class or None) and store.pvc_storage_class:
                problems.append(Problem("spec.store.pvc.storageClassName", "ImmutableClaim",
                                        f"the existing claim uses storage class {live.claim_storage_class!r}; "
                                        "a claim's storage class cannot change"))
            try:
                if live.claim_size and parse_bytes(store.pvc_size) < parse_bytes(live.claim_size):
                    problems.append(Problem("spec.store.pvc.size", "ImmutableClaim",
                                            f"the existing claim is {live.claim_size}; claims can grow but not shrink"))
            except QuantityError as exc:
                problems.append(Problem("spec.store.pvc.size", "InvalidQuantity", str(exc)))
    elif store.kind == "existingClaim" and live.claim_access_modes is not None:
        modes = live.claim_access_modes
        if "ReadWriteMany" not in modes and _may_spread(spec):
            problems.append(Problem("spec.store.existingClaim", "StoreNotShareable",
                                    f"claim {store.existing_claim!r} has accessModes {list(modes)}; {pods} worker "
                                    "pods that may run on different nodes need ReadWriteMany"))
    if store.capacity is not None:
        try:
            parse_bytes(store.capacity)
        except QuantityError as exc:
            problems.append(Problem("spec.store.capacity", "InvalidQuantity", str(exc)))
    return problems


def check_cluster(spec: ClusterSpec, live: LiveStore | None = None) -> list[Problem]:
    """Every reason `spec` cannot run as asked; empty when it can."""
    problems = _pool_problems(spec) + _store_problems(spec, live or LiveStore())
    if not spec.disaggregated and spec.router.fallback != "decode-only":
        problems.append(Problem("spec.router.fallback", "NoPrefillPools",
                                "a cluster without prefill pools can only serve with fallback: decode-only"))
    return problems
