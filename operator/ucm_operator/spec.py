"""The UCMCluster spec as typed, immutable Python values.

The API server has already validated and defaulted a spec the operator reads (crds/), but the same
parser also serves `ucm-operator render/validate` on a YAML file that never went through an API
server; so it applies the CRD's defaults itself and raises `SpecError` naming the field for the
structural mistakes it cannot continue past. Cross-field rules live in `compat.py`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal

JSON = dict[str, Any]
Role = Literal["prefill", "decode"]
StoreKind = Literal["pvc", "existingClaim", "nfs"]

_HF_SOURCE = re.compile(r"^hf://([A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*)$")
_PVC_SOURCE = re.compile(r"^pvc://([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)/(\S+)$")


class SpecError(ValueError):
    """A spec that cannot be turned into manifests; `field` is the path, e.g. spec.decode[0].name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    served_name: str
    source: str
    revision: str = "main"
    kv_heads: int | None = None
    mla: bool = False

    @property
    def hf_repo(self) -> str | None:
        """ORG/NAME for hf:// sources (what `vllm serve` downloads), else None."""
        match = _HF_SOURCE.match(self.source)
        return match.group(1) if match else None

    @property
    def pvc_claim(self) -> tuple[str, str] | None:
        """(claim, path inside the claim) for pvc:// sources, else None."""
        match = _PVC_SOURCE.match(self.source)
        return (match.group(1), match.group(2).strip("/")) if match else None

    @property
    def model_id(self) -> str:
        """The model identity in block hashes: the HF repo id, or the served name for weights on a
        PVC (the connector refuses local paths as identities: two mounts of one model must share)."""
        return self.hf_repo or self.served_name


@dataclasses.dataclass(frozen=True)
class EnvVar:
    name: str
    value: str | None = None
    value_from: JSON | None = None

    def to_k8s(self) -> JSON:
        env: JSON = {"name": self.name}
        if self.value_from is not None:
            env["valueFrom"] = self.value_from
        else:
            env["value"] = self.value or ""
        return env


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    image: str | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    block_size: int = 16
    dtype: str = "auto"
    max_model_len: int | None = None


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """`spec.sparse`: the connector's `ucm_sparse_config`. Only the fields the user set are passed
    on (as `settings`, in the connector's key names), so the algorithm's own defaults apply."""

    algorithm: str = "block_retrieval"
    settings: tuple[tuple[str, object], ...] = ()


# spec.sparse field -> (ucm_sparse_config key, type); the bounds are the CRD's
SPARSE_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "keepRatio": ("keep_ratio", (int, float)),
    "initBlocks": ("init_blocks", int),
    "localBlocks": ("local_blocks", int),
    "retrievalStride": ("retrieval_stride", int),
    "summary": ("summary", str),
    "minBlocks": ("min_blocks", int),
    "offload": ("offload", bool),
    "prefetchBlocks": ("prefetch_blocks", int),
    "hostCacheBlocks": ("host_cache_blocks", int),
}


@dataclasses.dataclass(frozen=True)
class BlendSpec:
    """`spec.blend`: cache blend (the connector's `ucm_blend_config`): chunks ended by
    `separator_ids` are reused from the store wherever they appear in a prompt, with the top
    `recompute_ratio` of their tokens recomputed from `check_layer` on."""

    separator_ids: tuple[int, ...]
    recompute_ratio: float | None = None
    check_layer: int | None = None

    def connector_config(self) -> dict[str, object]:
        """`ucm_blend_config`, with only the fields that are set (the connector's defaults apply)."""
        config: dict[str, object] = {"separator_ids": list(self.separator_ids)}
        if self.recompute_ratio is not None:
            config["recompute_ratio"] = self.recompute_ratio
        if self.check_layer is not None:
            config["check_layer"] = self.check_layer
        return config


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """`spec.window`: ReRoPE window extrapolation (the connector's `ucm_window_config`): exact
    relative positions within `window` tokens, clamped (or, with `leak`, compressed) beyond."""

    window: int
    leak: float | None = None
    log_scale: bool = False
    trained_length: int | None = None

    def connector_config(self) -> dict[str, object]:
        """`ucm_window_config`, with only the fields that are set (the connector's defaults apply)."""
        config: dict[str, object] = {"window": self.window}
        if self.leak is not None:
            config["leak"] = self.leak
        if self.log_scale:
            config["log_scale"] = True
        if self.trained_length is not None:
            config["trained_length"] = self.trained_length
        return config


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    kind: StoreKind
    pvc_storage_class: str | None = None
    pvc_size: str = "100Gi"
    pvc_access_mode: str = "ReadWriteMany"
    existing_claim: str | None = None
    nfs_server: str | None = None
    nfs_path: str | None = None
    mount_path: str = "/mnt/ucm"
    capacity: str | None = None
    durability: str = "none"
    reclaim_policy: str = "Retain"

    @property
    def field(self) -> str:
        """Path of the chosen store kind, for error messages."""
        return f"spec.store.{self.kind}"


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    role: Role
    index: int
    name: str
    replicas: int = 1
    tensor_parallel_size: int = 1
    gpu_count: int = 1
    gpu_product: str | None = None
    resources: JSON = dataclasses.field(default_factory=dict)
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[JSON, ...] = ()
    affinity: JSON | None = None
    image: str | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        return f"spec.{self.role}[{self.index}]"


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    replicas: int = 1
    policy: str = "prefix-affinity"
    fallback: str = "fail"
    service_type: str = "ClusterIP"
    port: int = 8000
    image: str | None = None
    resources: JSON = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PoolAutoscaling:
    """Bounds of one pool under `spec.autoscaling` (every pool is listed)."""

    name: str
    min_replicas: int
    max_replicas: int


@dataclasses.dataclass(frozen=True)
class AutoscalingSpec:
    """`spec.autoscaling`: decode sized by the routers' in-flight requests, prefill at the ratio
    (autoscale.py holds the rules)."""

    pools: tuple[PoolAutoscaling, ...]
    target_inflight_per_decode: float = 8.0
    ratio_prefill: int = 1
    ratio_decode: int = 1
    interval_seconds: int = 15
    scale_up_seconds: int = 0
    scale_down_seconds: int = 300


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """One UCMCluster: identity (for owner references and names) plus its parsed spec."""

    name: str
    namespace: str
    uid: str
    generation: int
    model: ModelSpec
    engine: EngineSpec
    store: StoreSpec
    prefill: tuple[PoolSpec, ...]
    decode: tuple[PoolSpec, ...]
    router: RouterSpec
    sparse: SparseSpec | None = None
    window: WindowSpec | None = None
    blend: BlendSpec | None = None
    autoscaling: AutoscalingSpec | None = None

    @property
    def pools(self) -> tuple[PoolSpec, ...]:
        return self.prefill + self.decode

    @property
    def disaggregated(self) -> bool:
        """True when prefill pools exist (PD); a decode-only cluster runs every pod as kv_both."""
        return bool(self.prefill)


# --- parsing ---------------------------------------------------------------------------------


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str, default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    # bool is an int in Python; a YAML `true` where a number belongs is still a mistake.
    if isinstance(value, bool) and kind in (int, (int,)):
        raise SpecError(f"{path}.{key}", f"expected an integer, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SpecError(f"{path}.{key}", f"expected {names}, got {type(value).__name__} {value!r}")
    return value


def _required(obj: Mapping[str, Any], key: str, kind: type, path: str) -> Any:
    if obj.get(key) is None:
        raise SpecError(f"{path}.{key}", "required")
    return _get(obj, key, kind, path)


def _str_list(obj: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    items = _get(obj, key, list, path, [])
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise SpecError(f"{path}.{key}[{i}]", f"expected a string, got {item!r}")
    return tuple(items)


def _parse_model(raw: Mapping[str, Any]) -> ModelSpec:
    path = "spec.model"
    model = ModelSpec(
        served_name=_required(raw, "servedName", str, path),
        source=_required(raw, "source", str, path),
        revision=str(_get(raw, "revision", (str, int), path, "main")),
        kv_heads=_get(raw, "kvHeads", int, path),
        mla=bool(_get(raw, "mla", bool, path, False)),
    )
    if model.hf_repo is None and model.pvc_claim is None:
        raise SpecError(f"{path}.source", f"{model.source!r}: expected hf://ORG/NAME or pvc://CLAIM/PATH")
    return model


def _parse_engine(raw: Mapping[str, Any]) -> EngineSpec:
    path = "spec.engine"
    env: list[EnvVar] = []
    for i, item in enumerate(_get(raw, "env", list, path, [])):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise SpecError(f"{path}.env[{i}]", "expected {name, value} or {name, valueFrom}")
        env.append(EnvVar(item["name"], None if item.get("value") is None else str(item["value"]),
                          item.get("valueFrom")))
    return EngineSpec(
        image=_get(raw, "image", str, path),
        extra_args=_str_list(raw, "extraArgs", path),
        env=tuple(env),
        block_size=_get(raw, "blockSize", int, path, 16),
        dtype=_get(raw, "dtype", str, path, "auto"),
        max_model_len=_get(raw, "maxModelLen", int, path),
    )


def _parse_sparse(raw: Mapping[str, Any] | None) -> SparseSpec | None:
    if raw is None:
        return None
    path = "spec.sparse"
    unknown = sorted(set(raw) - {"algorithm", *SPARSE_FIELDS})
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}", f"unknown field; expected one of algorithm, {', '.join(SPARSE_FIELDS)}")
    settings = []
    for field, (key, kind) in SPARSE_FIELDS.items():
        value = _get(raw, field, kind, path)
        if isinstance(value, bool) and kind is not bool:
            raise SpecError(f"{path}.{field}", f"expected a number, got {value!r}")
        if value is not None:
            settings.append((key, value))
    return SparseSpec(algorithm=_get(raw, "algorithm", str, path, "block_retrieval"), settings=tuple(settings))


def _parse_window(raw: Mapping[str, Any] | None, sparse: SparseSpec | None) -> WindowSpec | None:
    if raw is None:
        return None
    path = "spec.window"
    fields = ("window", "leak", "logScale", "trainedLength")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}", f"unknown field; expected one of {', '.join(fields)}")
    if sparse is not None:
        raise SpecError(path, "cannot be combined with spec.sparse: both replace vLLM's attention; set one")
    window = _required(raw, "window", int, path)
    if window < 1:
        raise SpecError(f"{path}.window", f"expected a positive number of tokens, got {window}")
    leak = _get(raw, "leak", (int, float), path)
    if isinstance(leak, bool) or (leak is not None and not leak > 1):
        raise SpecError(f"{path}.leak", f"expected a number > 1, got {leak!r}")
    trained = _get(raw, "trainedLength", int, path)
    if trained is not None and trained < 2:
        raise SpecError(f"{path}.trainedLength", f"expected at least 2 tokens, got {trained}")
    log_scale = _get(raw, "logScale", bool, path, False)
    if log_scale and trained is None:
        raise SpecError(f"{path}.trainedLength", "required when logScale is true (the model's trained context)")
    return WindowSpec(window=window, leak=None if leak is None else float(leak), log_scale=log_scale,
                      trained_length=trained)


def _parse_blend(raw: Mapping[str, Any] | None, others: Mapping[str, object]) -> BlendSpec | None:
    if raw is None:
        return None
    path = "spec.blend"
    fields = ("separatorIds", "recomputeRatio", "checkLayer")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}", f"unknown field; expected one of {', '.join(fields)}")
    for name, other in others.items():
        if other is not None:
            raise SpecError(path, f"cannot be combined with spec.{name}: both replace vLLM's attention; set one")
    ids = _required(raw, "separatorIds", list, path)
    if not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise SpecError(f"{path}.separatorIds", f"expected a non-empty list of token ids (integers >= 0), got {ids!r}")
    ratio = _get(raw, "recomputeRatio", (int, float), path)
    if isinstance(ratio, bool) or (ratio is not None and not 0 <= ratio <= 1):
        raise SpecError(f"{path}.recomputeRatio", f"expected a number in [0, 1], got {ratio!r}")
    layer = _get(raw, "checkLayer", int, path)
    if layer is not None and layer < 0:
        raise SpecError(f"{path}.checkLayer", f"expected an integer >= 0, got {layer}")
    return BlendSpec(separator_ids=tuple(ids), recompute_ratio=None if ratio is None else float(ratio),
                     check_layer=layer)


def _parse_store(raw: Mapping[str, Any]) -> StoreSpec:
    path = "spec.store"
    kinds: list[StoreKind] = [k for k in ("pvc", "existingClaim", "nfs") if raw.get(k) is not None]  # type: ignore[misc]
    if len(kinds) != 1:
        raise SpecError(path, f"exactly one of pvc, existingClaim and nfs must be set (got {kinds or 'none'})")
    common: JSON = {
        "mount_path": _get(raw, "mountPath", str, path, "/mnt/ucm"),
        "capacity": None if raw.get("capacity") is None else str(raw["capacity"]),
        "durability": _get(raw, "durability", str, path, "none"),
        "reclaim_policy": _get(raw, "reclaimPolicy", str, path, "Retain"),
    }
    kind = kinds[0]
    if kind == "pvc":
        pvc = _get(raw, "pvc", dict, path)
        return StoreSpec(kind="pvc", pvc_storage_class=_get(pvc, "storageClassName", str, f"{path}.pvc"),
                         pvc_size=str(pvc.get("size", "100Gi")),
                         pvc_access_mode=_get(pvc, "accessMode", str, f"{path}.pvc", "ReadWriteMany"), **common)
    if kind == "existingClaim":
        return StoreSpec(kind="existingClaim", existing_claim=_get(raw, "existingClaim", str, path), **common)
    nfs = _get(raw, "nfs", dict, path)
    return StoreSpec(kind="nfs", nfs_server=_required(nfs, "server", str, f"{path}.nfs"),
                     nfs_path=_required(nfs, "path", str, f"{path}.nfs"), **common)


def _parse_pool(raw: Any, role: Role, index: int) -> PoolSpec:
    path = f"spec.{role}[{index}]"
    if not isinstance(raw, dict):
        raise SpecError(path, f"expected a pool object, got {raw!r}")
    tp = _get(raw, "tensorParallelSize", int, path, 1)
    gpu = _get(raw, "gpu", dict, path, {})
    return PoolSpec(
        role=role,
        index=index,
        name=_required(raw, "name", str, path),
        replicas=_get(raw, "replicas", int, path, 1),
        tensor_parallel_size=tp,
        gpu_count=_get(gpu, "count", int, f"{path}.gpu", tp),
        gpu_product=_get(gpu, "product", str, f"{path}.gpu"),
        resources=_parse_resources(raw, path),
        node_selector={str(k): str(v) for k, v in _get(raw, "nodeSelector", dict, path, {}).items()},
        tolerations=tuple(_get(raw, "tolerations", list, path, [])),
        affinity=_get(raw, "affinity", dict, path),
        image=_get(raw, "image", str, path),
        extra_args=_str_list(raw, "extraArgs", path),
    )


def _parse_resources(raw: Mapping[str, Any], path: str) -> JSON:
    """A container's resources: `requests` and `limits` are objects when given (a YAML key left
    empty is null, which means the same as leaving it out)."""
    resources = dict(_get(raw, "resources", dict, path, {}))
    for key in ("requests", "limits"):
        value = _get(resources, key, dict, f"{path}.resources")
        if value is None:
            resources.pop(key, None)
        else:
            resources[key] = dict(value)
    return resources


def _parse_router(raw: Mapping[str, Any]) -> RouterSpec:
    path = "spec.router"
    service = _get(raw, "service", dict, path, {})
    return RouterSpec(
        replicas=_get(raw, "replicas", int, path, 1),
        policy=_get(raw, "policy", str, path, "prefix-affinity"),
        fallback=_get(raw, "fallback", str, path, "fail"),
        service_type=_get(service, "type", str, f"{path}.service", "ClusterIP"),
        port=_get(service, "port", int, f"{path}.service", 8000),
        image=_get(raw, "image", str, path),
        resources=_parse_resources(raw, path),
    )


def _parse_autoscaling(raw: Mapping[str, Any] | None, pools: tuple[PoolSpec, ...]) -> AutoscalingSpec | None:
    if raw is None:
        return None
    path = "spec.autoscaling"
    fields = ("pools", "targetInflightPerDecode", "ratio", "intervalSeconds", "scaleUpStabilizationSeconds",
              "scaleDownStabilizationSeconds")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"{path}.{unknown[0]}", f"unknown field; expected one of {', '.join(fields)}")
    names = {p.name for p in pools}
    bounds: list[PoolAutoscaling] = []
    for i, item in enumerate(_required(raw, "pools", list, path)):
        where = f"{path}.pools[{i}]"
        if not isinstance(item, dict):
            raise SpecError(where, f"expected {{name, minReplicas, maxReplicas}}, got {item!r}")
        name = _required(item, "name", str, where)
        if name not in names:
            raise SpecError(f"{where}.name", f"{name!r} is not a prefill or decode pool of this cluster")
        if any(b.name == name for b in bounds):
            raise SpecError(f"{where}.name", f"{name!r} is listed twice")
        bounds.append(PoolAutoscaling(name, _get(item, "minReplicas", int, where, 1),
                                      _required(item, "maxReplicas", int, where)))
    missing = [p.name for p in pools if p.name not in {b.name for b in bounds}]
    if missing:
        raise SpecError(f"{path}.pools", f"every pool needs bounds here; missing {', '.join(missing)}")
    ratio = _get(raw, "ratio", dict, path, {})
    target = _get(raw, "targetInflightPerDecode", (int, float), path, 8.0)
    if isinstance(target, bool):
        raise SpecError(f"{path}.targetInflightPerDecode", f"expected a number, got {target!r}")
    return AutoscalingSpec(
        pools=tuple(bounds),
        target_inflight_per_decode=float(target),
        ratio_prefill=_get(ratio, "prefill", int, f"{path}.ratio", 1),
        ratio_decode=_get(ratio, "decode", int, f"{path}.ratio", 1),
        interval_seconds=_get(raw, "intervalSeconds", int, path, 15),
        scale_up_seconds=_get(raw, "scaleUpStabilizationSeconds", int, path, 0),
        scale_down_seconds=_get(raw, "scaleDownStabilizationSeconds", int, path, 300),
    )


def parse_cluster(body: Mapping[str, Any]) -> ClusterSpec:
    """A UCMCluster object (as the API returns it, or as written in a YAML file) -> ClusterSpec."""
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SpecError("metadata", f"expected an object, got {type(meta).__name__}")
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise SpecError("spec", "required")
    # The API server guarantees these; a YAML file checked with `ucm-operator validate` does not.
    if not _get(meta, "name", str, "metadata"):
        raise SpecError("metadata.name", "required")
    for key in ("namespace", "uid"):
        _get(meta, key, str, "metadata")
    _get(meta, "generation", int, "metadata")
    pools: dict[Role, tuple[PoolSpec, ...]] = {}
    roles: tuple[Role, ...] = ("prefill", "decode")
    for role in roles:
        raw_pools = _get(spec, role, list, "spec", [])
        pools[role] = tuple(_parse_pool(p, role, i) for i, p in enumerate(raw_pools))
    if not pools["decode"]:
        raise SpecError("spec.decode", "at least one decode pool is required")
    sparse = _parse_sparse(_get(spec, "sparse", dict, "spec"))
    window = _parse_window(_get(spec, "window", dict, "spec"), sparse)
    autoscaling = _parse_autoscaling(_get(spec, "autoscaling", dict, "spec"), pools["prefill"] + pools["decode"])
    return ClusterSpec(
        name=meta["name"],
        namespace=str(meta.get("namespace") or "default"),
        uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0),
        model=_parse_model(_required(spec, "model", dict, "spec")),
        engine=_parse_engine(_get(spec, "engine", dict, "spec", {})),
        store=_parse_store(_required(spec, "store", dict, "spec")),
        prefill=pools["prefill"],
        decode=pools["decode"],
        router=_parse_router(_get(spec, "router", dict, "spec", {})),
        sparse=sparse,
        window=window,
        blend=_parse_blend(_get(spec, "blend", dict, "spec"), {"sparse": sparse, "window": window}),
        autoscaling=autoscaling,
    )
