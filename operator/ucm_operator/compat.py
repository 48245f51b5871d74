"""The checks the CRD's CEL rules cannot express, because they need vLLM argument parsing, the
model's geometry, or live objects: are the pools PD-compatible (would every pool produce and read
the same KV blocks), can the store be shared by every pod, can the live claim become what the spec
asks. A spec that fails any of them is reported as Valid=False and changes nothing that runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from . import vllm_args
from .build_workers import operator_args, worker_mounts
from .quantity import QuantityError, parse_bytes
from .spec import ClusterSpec, PoolSpec
from .vllm_flags import DEFAULTS

# vLLM dests (argparse names) the operator sets from a spec field; setting them in extraArgs, in
# any spelling vLLM accepts (vllm_args.py), would either override the field (vLLM keeps the last
# occurrence) or break the PD hand-off.
OWNED_DESTS: dict[str, str] = {
    "model": "spec.model.source",
    "model_tag": "spec.model.source",
    "served_model_name": "spec.model.servedName",
    "revision": "spec.model.revision",
    "host": "the operator (0.0.0.0)",
    "port": "the operator (8000)",
    "block_size": "spec.engine.blockSize",
    "dtype": "spec.engine.dtype",
    "max_model_len": "spec.engine.maxModelLen",
    "tensor_parallel_size": "the pool's tensorParallelSize",
    "kv_transfer_config": "the operator (UCM connector in the pool's role)",
    "data_parallel_size": "the pool's replicas",
}
# Flags the operator cannot see through: they load more flags from elsewhere.
UNCHECKABLE_DESTS: dict[str, str] = {
    "config": "reads more flags from a file inside the image, which the operator cannot check; "
              "put those flags in extraArgs",
}
# Dests that change the bytes of a KV block (or the tokens that are hashed): every pool must
# agree, or a block written by prefill is not the block decode looks for.
KV_DESTS: tuple[str, ...] = (
    "kv_cache_dtype",
    "kv_cache_dtype_skip_layers",
    "quantization",
    "hf_overrides",
    "tokenizer",
    "tokenizer_revision",
    "tokenizer_mode",
    "code_revision",
)
JSON_DESTS = frozenset({"hf_overrides"})


def flag_name(dest: str) -> str:
    """The long option vLLM documents for `dest` (--kv-cache-dtype for kv_cache_dtype)."""
    return "--" + dest.replace("_", "-")


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


def _arg_field(spec: ClusterSpec, pool: PoolSpec, index: int) -> str:
    """Field of argument `index` of engine.extraArgs + the pool's extraArgs."""
    engine = len(spec.engine.extra_args)
    return f"spec.engine.extraArgs[{index}]" if index < engine else f"{pool.field}.extraArgs[{index - engine}]"


def _canonical(dest: str, value: Any) -> str:
    """A value as pools compare it: JSON flags by content, lists space-separated, "" and "None"
    as None (vLLM's optional types read them so)."""
    if value in ("", "None", None):
        return "None"
    if dest in JSON_DESTS and isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if dest in JSON_DESTS and isinstance(value, str):
        try:
            return json.dumps(json.loads(value), sort_keys=True, separators=(",", ":"))
        except ValueError:
            return value
    return " ".join(value) if isinstance(value, list) else str(value)


def engine_args(spec: ClusterSpec, pool: PoolSpec) -> vllm_args.Parsed:
    """What vLLM 0.32 makes of the pool's command line (indices: engine + pool extraArgs)."""
    return vllm_args.parse(operator_args(spec, pool), list(spec.engine.extra_args) + list(pool.extra_args))


def _arg_problems(spec: ClusterSpec, pool: PoolSpec, parsed: vllm_args.Parsed) -> list[Problem]:
    args = list(spec.engine.extra_args) + list(pool.extra_args)
    problems = []
    for dest, indices in sorted(parsed.set_by.items(), key=lambda kv: kv[1]):
        for i in indices:
            if dest in OWNED_DESTS:
                problems.append(Problem(_arg_field(spec, pool, i), "OperatorOwnedFlag",
                                        f"{args[i]!r} sets {flag_name(dest)} (as vLLM reads it), which is set by the "
                                        f"operator from {OWNED_DESTS[dest]}; remove it from extraArgs"))
            elif dest in UNCHECKABLE_DESTS:
                problems.append(Problem(_arg_field(spec, pool, i), "UncheckableFlag",
                                        f"{flag_name(dest)} {UNCHECKABLE_DESTS[dest]}"))
    if parsed.error is not None:
        index, message = parsed.error
        problems.append(Problem(_arg_field(spec, pool, max(index, 0)), "InvalidEngineArgs",
                                f"vllm serve (vLLM 0.32) would exit: {message}"))
    return problems


def _kv_settings(parsed: vllm_args.Parsed) -> dict[str, tuple[str, str]]:
    """flag -> (effective value, how to show it): an unset flag has vLLM's default."""
    settings = {}
    for dest in KV_DESTS:
        if dest in parsed.values:
            value = _canonical(dest, parsed.values[dest])
            settings[flag_name(dest)] = (value, value)
        else:
            value = _canonical(dest, DEFAULTS.get(dest))
            settings[flag_name(dest)] = (value, f"{value} (default)")
    return settings


def _pool_problems(spec: ClusterSpec) -> list[Problem]:
    problems: list[Problem] = []
    try:
        parsed = {pool.field: engine_args(spec, pool) for pool in spec.pools}
    except QuantityError:
        return []   # no command line without a valid spec.store.capacity, which _store_problems names
    for pool in spec.pools:
        for problem in _arg_problems(spec, pool, parsed[pool.field]):
            if problem not in problems:   # engine.extraArgs are in every pool's command line
                problems.append(problem)
        pp_text = str(parsed[pool.field].values.get("pipeline_parallel_size", "1"))
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
    ref_settings = _kv_settings(parsed[reference.field])
    for pool in spec.pools:
        if pool is reference:
            continue
        settings = _kv_settings(parsed[pool.field])
        for name, (value, shown) in settings.items():
            if value != ref_settings[name][0]:
                problems.append(Problem(f"{pool.field}.extraArgs", "IncompatiblePools",
                                        f"{name} is {shown} here but {ref_settings[name][1]} in {reference.field} "
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
        problems += _existing_claim_problems(spec, live, pods)
    if store.capacity is not None:
        try:
            parse_bytes(store.capacity)
        except QuantityError as exc:
            problems.append(Problem("spec.store.capacity", "InvalidQuantity", str(exc)))
    problems += _mount_problems(spec)
    return problems


def _existing_claim_problems(spec: ClusterSpec, live: LiveStore, pods: int) -> list[Problem]:
    """Can the user's claim hold the store and be mounted read-write by every worker pod?"""
    store, modes = spec.store, list(live.claim_access_modes or ())
    problems: list[Problem] = []
    writable = [m for m in modes if m in ("ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")]
    claim = f"claim {store.existing_claim!r} has accessModes {modes}"
    if not writable:
        problems.append(Problem("spec.store.existingClaim", "StoreNotWritable",
                                f"{claim}; prefill pods write the store, so it needs ReadWriteMany"))
    elif "ReadWriteMany" not in modes and "ReadWriteOnce" in modes and _may_spread(spec):
        problems.append(Problem("spec.store.existingClaim", "StoreNotShareable",
                                f"{claim}; {pods} worker pods that may run on different nodes need ReadWriteMany"))
    elif writable == ["ReadWriteOncePod"] and pods > 1:
        problems.append(Problem("spec.store.existingClaim", "StoreNotShareable",
                                f"{claim}; ReadWriteOncePod lets only one of the {pods} worker pods mount it"))
    if store.capacity is not None and live.claim_size:
        try:
            if parse_bytes(store.capacity) > parse_bytes(live.claim_size):
                problems.append(Problem("spec.store.capacity", "ClaimTooSmall",
                                        f"{store.capacity} of KV does not fit claim {store.existing_claim!r}, which "
                                        f"holds {live.claim_size}; lower capacity or grow the claim"))
        except QuantityError:
            pass   # an invalid capacity is reported below; a claim's size is the API server's
    return problems


def _mount_problems(spec: ClusterSpec) -> list[Problem]:
    """The store's mount must not be, or lie inside or around, another mount of the worker
    container (the UCM config, /dev/shm, the model): one would hide the other."""
    def inside(path: str, parent: str) -> bool:
        return path.rstrip("/") == parent.rstrip("/") or path.startswith(parent.rstrip("/") + "/")

    store, *others = worker_mounts(spec)
    problems = []
    for other in others:
        if inside(store["mountPath"], other["mountPath"]) or inside(other["mountPath"], store["mountPath"]):
            problems.append(Problem("spec.store.mountPath", "MountPathCollision",
                                    f"{spec.store.mount_path} collides with {other['mountPath']}, where the worker "
                                    f"pods mount {other['name']}; choose a path outside it (e.g. /mnt/ucm)"))
    return problems


def check_cluster(spec: ClusterSpec, live: LiveStore | None = None) -> list[Problem]:
    """Every reason `spec` cannot run as asked; empty when it can."""
    problems = _pool_problems(spec) + _store_problems(spec, live or LiveStore())
    if not spec.disaggregated and spec.router.fallback != "decode-only":
        problems.append(Problem("spec.router.fallback", "NoPrefillPools",
                                "a cluster without prefill pools can only serve with fallback: decode-only"))
    return problems
