"""Manifests for the vLLM worker pools: one Deployment per pool, a headless Service per role, and a
PodDisruptionBudget per multi-replica pool. Pure functions of the parsed spec.
"""

from __future__ import annotations

import copy
import json

from .constants import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    ROLE_DECODE,
    ROLE_PREFILL,
    WORKER_PORT,
)
from .meta import (
    JSON,
    claim_name,
    config_map_name,
    connector_extra_config,
    engine_image,
    labels,
    object_meta,
    pool_name,
    revision,
    role_service_name,
    selector_labels,
)
from .spec import ClusterSpec, PoolSpec

STORE_VOLUME = "ucm-store"
CONFIG_VOLUME = "ucm-config"
MODEL_VOLUME = "model"
MODEL_MOUNT = "/models"
CONFIG_MOUNT = "/etc/ucm"
GPU_TOLERATION: JSON = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# Scale-in and rollouts drain a worker instead of cutting its streams: on deletion the pod's
# endpoint turns terminating, which the router (watching EndpointSlices) stops routing to within
# about a second; the preStop pause keeps vLLM serving until the router has seen it, and only then
# comes SIGTERM, after which vLLM (--shutdown-timeout; its default 0 aborts every request in
# flight) finishes what it holds. Both fit the pod's grace period.
PRESTOP_SECONDS = 5
DRAIN_SECONDS = 45
GRACE_SECONDS = 60


def kv_role(spec: ClusterSpec, pool: PoolSpec) -> str:
    """The connector role of a pool: prefill produces KV, decode consumes it; without prefill pools
    decode pods do both, so repeated prefixes still come from the store."""
    if pool.role == ROLE_PREFILL:
        return "kv_producer"
    return "kv_consumer" if spec.disaggregated else "kv_both"


def kv_transfer_config(spec: ClusterSpec, pool: PoolSpec) -> JSON:
    return {
        "kv_connector": "UCMConnector",
        "kv_connector_module_path": "ucm.connector",
        "kv_role": kv_role(spec, pool),
        "kv_connector_extra_config": connector_extra_config(spec),
    }


def model_argument(spec: ClusterSpec) -> str:
    """What `vllm serve` loads: the HF repo id, or the directory on the read-only model claim."""
    pvc = spec.model.pvc_claim
    return f"{MODEL_MOUNT}/{pvc[1]}" if pvc else str(spec.model.hf_repo)


def vllm_args(spec: ClusterSpec, pool: PoolSpec) -> list[str]:
    """Arguments after `vllm serve` (the command line agreed in docs/interfaces): the operator's
    own, then engine.extraArgs, then the pool's extraArgs."""
    return operator_args(spec, pool) + list(spec.engine.extra_args) + list(pool.extra_args)


def operator_args(spec: ClusterSpec, pool: PoolSpec) -> list[str]:
    """The part of the command line the operator writes from spec fields (model positional first)."""
    engine = spec.engine
    args = [
        model_argument(spec),
        "--served-model-name", spec.model.served_name,
        "--host", "0.0.0.0",
        "--port", str(WORKER_PORT),
        "--block-size", str(engine.block_size),
        "--dtype", engine.dtype,
    ]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
        if spec.window is not None:
            # ReRoPE serves past the trained context: the model's rotary table (sized by
            # max_position_embeddings) must cover every position, or vLLM refuses the length
            args += ["--hf-overrides", json.dumps({"max_position_embeddings": engine.max_model_len})]
    args += ["--tensor-parallel-size", str(pool.tensor_parallel_size)]
    if spec.model.hf_repo:
        args += ["--revision", spec.model.revision]
    # A default, not owned: extraArgs come later on the command line and win.
    args += ["--shutdown-timeout", str(DRAIN_SECONDS)]
    args += ["--kv-transfer-config", json.dumps(kv_transfer_config(spec, pool), sort_keys=True, separators=(",", ":"))]
    return args


def _resources(pool: PoolSpec) -> JSON:
    """The pool's CPU/memory plus its GPUs; an extended resource needs equal request and limit."""
    resources = copy.deepcopy(pool.resources)
    gpus = str(pool.gpu_count)
    resources.setdefault("requests", {})[GPU_RESOURCE] = gpus
    resources.setdefault("limits", {})[GPU_RESOURCE] = gpus
    return resources


def pod_tolerations(pool: PoolSpec) -> list[JSON]:
    """The pool's tolerations plus the GPU taint's, unless the pool already tolerates it."""
    tolerations = [copy.deepcopy(t) for t in pool.tolerations]
    if not any(t.get("key") == GPU_RESOURCE and t.get("operator", "Equal") == "Exists" for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    return tolerations


def _node_selector(pool: PoolSpec) -> dict[str, str]:
    selector = dict(pool.node_selector)
    if pool.gpu_product:
        selector[GPU_PRODUCT_LABEL] = pool.gpu_product
    return selector


def store_volume(spec: ClusterSpec) -> JSON:
    store = spec.store
    if store.kind == "nfs":
        return {"name": STORE_VOLUME, "nfs": {"server": store.nfs_server, "path": store.nfs_path}}
    return {"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": claim_name(spec)}}


def _volumes(spec: ClusterSpec) -> tuple[list[JSON], list[JSON]]:
    volumes = [
        store_volume(spec),
        {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name(spec)}},
        # NCCL and vLLM's shared-memory broadcast need more /dev/shm than a container's 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[JSON] = [
        {"name": STORE_VOLUME, "mountPath": spec.store.mount_path},
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    pvc = spec.model.pvc_claim
    if pvc:
        volumes.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": pvc[0], "readOnly": True}})
        mounts.append({"name": MODEL_VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True})
    return volumes, mounts


def worker_mounts(spec: ClusterSpec) -> list[JSON]:
    """Every volume mount of a worker container, the store's first."""
    return _volumes(spec)[1]


def _probe(period: int, failures: int) -> JSON:
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def build_pool_deployment(spec: ClusterSpec, pool: PoolSpec) -> JSON:
    """One Deployment per pool: vLLM with the UCM connector in the pool's role, on the pool's GPU
    product, mounting the shared store."""
    rev = revision(spec)
    volumes, mounts = _volumes(spec)
    container: JSON = {
        "name": "vllm",
        "image": pool.image or engine_image(spec),
        "imagePullPolicy": "IfNotPresent",
        "command": ["vllm", "serve"],
        "args": vllm_args(spec, pool),
        "env": [e.to_k8s() for e in spec.engine.env],
        "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
        "resources": _resources(pool),
        "volumeMounts": mounts,
        # Loading weights (and downloading them) can take many minutes: the startup probe holds
        # off liveness until /health answers once, for up to 30 minutes.
        "startupProbe": _probe(10, 180),
        "readinessProbe": _probe(5, 3),
        "livenessProbe": _probe(15, 4),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
    }
    pod_spec: JSON = {
        "containers": [container],
        "volumes": volumes,
        "nodeSelector": _node_selector(pool),
        "tolerations": pod_tolerations(pool),
        "terminationGracePeriodSeconds": GRACE_SECONDS,
    }
    if pool.affinity:
        pod_spec["affinity"] = copy.deepcopy(pool.affinity)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(spec, pool_name(spec, pool.name), pool.role, pool.name),
        "spec": {
            "replicas": pool.replicas,
            "selector": {"matchLabels": selector_labels(spec, pool.role, pool.name)},
            # A rollout never lowers serving capacity: one extra pod per pool at a time.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels(spec, pool.role, pool.name, rev)},
                "spec": pod_spec,
            },
        },
    }


def build_role_service(spec: ClusterSpec, role: str) -> JSON:
    """Headless Service over all pools of one role; its EndpointSlices are what the router
    discovers (it reads each endpoint's pool and revision from the Pod's labels)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(spec, role_service_name(spec, role), role),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(spec, role),
            "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"}],
            "publishNotReadyAddresses": False,
        },
    }


def build_pdb(spec: ClusterSpec, role: str, pool: str, name: str) -> JSON:
    """At most one pod of a pool voluntarily disrupted at a time (node drains, upgrades)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(spec, name, role, pool),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(spec, role, pool)}},
    }


def build_workers(spec: ClusterSpec) -> list[JSON]:
    children = [build_pool_deployment(spec, pool) for pool in spec.pools]
    children += [build_role_service(spec, role) for role in (ROLE_PREFILL, ROLE_DECODE)
                 if any(p.role == role for p in spec.pools)]
    # A PDB over a single replica would block every node drain forever; only pools of 2+ get one.
    children += [build_pdb(spec, pool.role, pool.name, pool_name(spec, pool.name))
                 for pool in spec.pools if pool.replicas > 1]
    return children
