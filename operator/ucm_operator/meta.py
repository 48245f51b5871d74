"""Object metadata shared by every builder: child names, labels, owner references, the revision
hash and the applied-hash annotation.

Everything here is a pure function of the parsed spec, so two operator processes (or one process
before and after a restart) compute byte-identical manifests and hashes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .constants import (
    ANNOTATION_APPLIED_HASH,
    API_VERSION,
    KIND,
    LABEL_CLUSTER,
    LABEL_MANAGED_BY,
    LABEL_POOL,
    LABEL_REVISION,
    LABEL_ROLE,
    MANAGED_BY,
    worker_image_default,
)
from .quantity import parse_bytes
from .spec import ClusterSpec

JSON = dict[str, Any]


def canonical_json(value: Any) -> str:
    """Stable text of a JSON value (sorted keys, no whitespace): the input of every hash here."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def short_hash(value: Any, length: int = 10) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def engine_image(spec: ClusterSpec) -> str:
    return spec.engine.image or worker_image_default()


def store_identity(spec: ClusterSpec) -> JSON:
    """Where the KV bytes live, as far as pairing is concerned: pods on different stores can never
    hand KV to each other, so a store change is a new revision."""
    store = spec.store
    if store.kind == "pvc":
        where: JSON = {"pvc": claim_name(spec)}
    elif store.kind == "existingClaim":
        where = {"existingClaim": store.existing_claim}
    else:
        where = {"nfs": f"{store.nfs_server}:{store.nfs_path}"}
    return {**where, "mountPath": store.mount_path}


# The connector's accepted `max_tp_size` values (ucm.connector.heads.MAX_TP_SIZES; the operator
# imports nothing from the connector, which needs vLLM).
CONNECTOR_MAX_TP_SIZES = (1, 2, 4, 8)


def max_tp_size(spec: ClusterSpec) -> int:
    """The connector's `max_tp_size` for every pool of the cluster: the largest tensorParallelSize
    of any prefill or decode pool, rounded up to an accepted value (8 beyond that). The connector
    groups KV heads into stored objects for this TP size, so larger objects when every pool is
    small (a file store writes 1-2 MiB objects ~3x faster than 256 KiB ones); all pools get the
    same value, because blocks grouped differently never match."""
    largest = max(pool.tensor_parallel_size for pool in spec.pools)
    return next((size for size in CONNECTOR_MAX_TP_SIZES if size >= largest), CONNECTOR_MAX_TP_SIZES[-1])


def connector_extra_config(spec: ClusterSpec) -> JSON:
    """The UCM connector's kv_connector_extra_config (keys per docs/interfaces: store_path,
    model_id, model_revision, durability, max_tp_size, capacity_bytes, ucm_sparse_config,
    ucm_window_config, ucm_blend_config). Identical
    for every pool: it is what makes their block hashes and store keys agree (and a decode pod's
    sparse attention reads what any prefill pod wrote)."""
    store = spec.store
    config: JSON = {
        "store_path": store.mount_path,
        "model_id": spec.model.model_id,
        "model_revision": spec.model.revision,
        "durability": store.durability,
        # Part of the revision through this function: pools grouping KV heads differently never
        # share blocks, so a TP change must not pair old and new pods.
        "max_tp_size": max_tp_size(spec),
    }
    if store.capacity is not None:
        config["capacity_bytes"] = parse_bytes(store.capacity)
    if spec.sparse is not None:
        config["ucm_sparse_config"] = {"name": spec.sparse.algorithm, **dict(spec.sparse.settings)}
    if spec.window is not None:
        config["ucm_window_config"] = spec.window.connector_config()
    if spec.blend is not None:
        config["ucm_blend_config"] = spec.blend.connector_config()
    return config


def revision(spec: ClusterSpec) -> str:
    """Hash of everything that changes the KV bytes or the engine every pool runs. The router
    pairs prefill and decode pods only within one revision; a pool's own overrides (image for its
    GPU architecture, scheduling, resources) roll that pool but keep the revision, and
    compat.check_cluster refuses overrides that would change KV bytes."""
    model, engine = spec.model, spec.engine
    return short_hash({
        "model": {"source": model.source, "revision": model.revision, "servedName": model.served_name,
                  "kvHeads": model.kv_heads, "mla": model.mla},
        "engine": {"image": engine_image(spec), "extraArgs": list(engine.extra_args),
                   "env": [e.to_k8s() for e in engine.env], "blockSize": engine.block_size,
                   "dtype": engine.dtype, "maxModelLen": engine.max_model_len},
        "store": store_identity(spec),
        "connector": connector_extra_config(spec),
    })


# --- names -----------------------------------------------------------------------------------


def pool_name(spec: ClusterSpec, pool: str) -> str:
    return f"{spec.name}-{pool}"


def role_service_name(spec: ClusterSpec, role: str) -> str:
    return f"{spec.name}-{role}"


def router_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-router"


def claim_name(spec: ClusterSpec) -> str:
    """The claim worker pods mount: the one the operator creates, or the user's existing one."""
    if spec.store.kind == "existingClaim":
        return str(spec.store.existing_claim)
    return f"{spec.name}-store"


def config_map_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-ucm-config"


def router_url(spec: ClusterSpec) -> str:
    return f"http://{router_name(spec)}.{spec.namespace}.svc:{spec.router.port}"


# --- labels, owner, hash ---------------------------------------------------------------------


def selector_labels(spec: ClusterSpec, role: str | None = None, pool: str | None = None) -> dict[str, str]:
    """Labels that select a set of children; stable across revisions (Deployment selectors are
    immutable)."""
    labels = {LABEL_CLUSTER: spec.name}
    if role:
        labels[LABEL_ROLE] = role
    if pool:
        labels[LABEL_POOL] = pool
    return labels


def labels(spec: ClusterSpec, role: str, pool: str | None = None, rev: str | None = None) -> dict[str, str]:
    """Labels on every child: cluster, role, pool (where one applies), revision, managed-by."""
    result = selector_labels(spec, role, pool)
    result[LABEL_REVISION] = rev if rev is not None else revision(spec)
    result[LABEL_MANAGED_BY] = MANAGED_BY
    return result


def owner_reference(spec: ClusterSpec) -> JSON:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": spec.name, "uid": spec.uid, "controller": True}


def object_meta(spec: ClusterSpec, name: str, role: str, pool: str | None = None, *, owned: bool = True) -> JSON:
    meta: JSON = {"name": name, "namespace": spec.namespace, "labels": labels(spec, role, pool)}
    if owned and spec.uid:
        meta["ownerReferences"] = [owner_reference(spec)]
    return meta


def with_applied_hash(manifest: JSON) -> JSON:
    """`manifest` plus the annotation holding the hash of everything else in it. The reconciler
    applies a child only when this hash differs from the live object's (or the live object was
    changed by someone else since), so a resync with nothing to do sends no write."""
    meta = manifest.setdefault("metadata", {})
    annotations = meta.setdefault("annotations", {})
    annotations.pop(ANNOTATION_APPLIED_HASH, None)
    annotations[ANNOTATION_APPLIED_HASH] = short_hash(manifest, 16)
    return manifest
