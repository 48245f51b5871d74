"""spec -> every child manifest of a UCMCluster: the pure entry point of reconciliation.

`build_children` is all the reconciler needs to know about what should exist; it is a pure
function, so `ucm-operator render` and the unit tests see exactly what the operator applies.
"""

from __future__ import annotations

import json

from .build_router import build_router
from .build_workers import build_workers, kv_transfer_config
from .constants import ROLE_CONFIG, ROLE_STORE
from .meta import (
    JSON,
    claim_name,
    config_map_name,
    connector_extra_config,
    object_meta,
    revision,
    with_applied_hash,
)
from .scale import build_pool_scaler
from .spec import ClusterSpec


def build_config_map(spec: ClusterSpec) -> JSON:
    """The UCM configuration, mounted read-only at /etc/ucm in every worker: what `ucm store stats`
    and a human debugging "my cache never hits" need to know (store path, model identity, salt
    inputs, each pool's connector config)."""
    ucm = {
        "cluster": spec.name,
        "revision": revision(spec),
        "block_size": spec.engine.block_size,
        "dtype": spec.engine.dtype,
        **connector_extra_config(spec),
    }
    data = {"ucm.json": json.dumps(ucm, indent=2, sort_keys=True) + "\n"}
    for pool in spec.pools:
        data[f"kv-transfer-{pool.name}.json"] = json.dumps(kv_transfer_config(spec, pool), indent=2, sort_keys=True) + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": object_meta(spec, config_map_name(spec), ROLE_CONFIG), "data": data}


def build_claim(spec: ClusterSpec) -> JSON | None:
    """The store PVC when spec.store.pvc asks for one. Owned by the UCMCluster (so garbage
    collection deletes it) only under reclaimPolicy Delete; under Retain it has no owner and
    outlives the cluster, and a cluster re-created under the same name adopts it again."""
    store = spec.store
    if store.kind != "pvc":
        return None
    claim_spec: JSON = {"accessModes": [store.pvc_access_mode],
                        "resources": {"requests": {"storage": store.pvc_size}}}
    if store.pvc_storage_class:
        claim_spec["storageClassName"] = store.pvc_storage_class
    owned = store.reclaim_policy == "Delete"
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": object_meta(spec, claim_name(spec), ROLE_STORE, owned=owned), "spec": claim_spec}


def build_children(spec: ClusterSpec) -> list[JSON]:
    """Every object the cluster needs, each annotated with the hash of its own content. Pool
    sizes are `spec`'s: the reconciler passes the spec resized by scale.plan_replicas."""
    children = [build_config_map(spec)]
    claim = build_claim(spec)
    if claim is not None:
        children.append(claim)
    children += build_workers(spec)
    children += build_router(spec)
    # Last: a pass interrupted early has created the workloads; a missing UCMPool is re-created
    # (and re-based to the UCMCluster's replicas) by the next pass.
    children += [build_pool_scaler(spec, pool) for pool in spec.pools]
    return [with_applied_hash(child) for child in children]
