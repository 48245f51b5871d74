"""Names shared by the builders, the status computation and the runtime: the API group of the
UCMCluster, the labels every child carries, the field manager, and the default images.

One place, so the builders (which write labels) and the router/status code (which select on
them) cannot disagree.
"""

from __future__ import annotations

import os

GROUP = "ucm.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "UCMCluster"
PLURAL = "ucmclusters"
# One UCMPool per worker pool: the Scale subresource (kubectl scale, HPA, KEDA) of that pool.
POOL_KIND = "UCMPool"
POOL_PLURAL = "ucmpools"

# Server-side apply field manager: every write the operator makes is under this one name, so the
# API server's managedFields say exactly which fields the operator owns.
FIELD_MANAGER = "ucm-operator"

LABEL_CLUSTER = "ucm.dev/cluster"
LABEL_ROLE = "ucm.dev/role"
LABEL_POOL = "ucm.dev/pool"
LABEL_REVISION = "ucm.dev/revision"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "ucm-operator"

# Hash of the manifest as last applied: a resync whose desired manifest hashes the same as the
# live object's annotation skips the apply, which is what makes a no-op resync write nothing.
ANNOTATION_APPLIED_HASH = "ucm.dev/applied-hash"

ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLE_ROUTER = "router"
ROLE_STORE = "store"
ROLE_CONFIG = "config"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

WORKER_PORT = 8000
ROUTER_PORT = 8000

# How often a cluster's worker pods' /metrics are read for status.store (ucm-operator run
# --store-scrape-seconds): often enough for a hit rate that means "lately", rarely enough that
# a cluster of many pods costs the operator little.
STORE_SCRAPE_SECONDS = 30.0


def worker_image_default() -> str:
    """The worker image (vLLM + ucm, images/worker.Dockerfile) used when spec.engine.image is unset.
    The chart sets UCM_WORKER_IMAGE to the image it was released with."""
    return os.environ.get("UCM_WORKER_IMAGE", "ucm-worker:0.1.0")


def router_image_default() -> str:
    """The router image (images/router.Dockerfile) used when spec.router.image is unset."""
    return os.environ.get("UCM_ROUTER_IMAGE", "ucm-router:0.1.0")
