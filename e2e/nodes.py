"""The simulated nodes of the local control plane.

They look like a real heterogeneous GPU cluster to the scheduler and to the operator: GPU nodes
carry the labels the NVIDIA GPU feature discovery sets (`nvidia.com/gpu.product`, `.count`,
`.memory`), allocatable `nvidia.com/gpu`, and the `nvidia.com/gpu=present:NoSchedule` taint that
GPU node pools use so that only pods which tolerate it land there; one CPU-only node hosts the
router and the operator. kwok manages exactly the nodes annotated `kwok.x-k8s.io/node=fake`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}

H100 = "NVIDIA-H100-80GB-HBM3"
L40S = "NVIDIA-L40S"


@dataclass(frozen=True)
class NodePool:
    """`count` identical nodes named `<name>-0`, `<name>-1`, ..."""

    name: str
    count: int
    cpu: str
    memory: str
    gpu_product: str | None = None
    gpus: int = 0
    gpu_memory_mib: int = 0
    pods: int = 110


# Two GPU products (one Hopper, one Ada) so heterogeneous prefill/decode placement is testable,
# plus a CPU-only node that the GPU taint keeps ordinary pods on.
DEFAULT_POOLS: tuple[NodePool, ...] = (
    NodePool("gpu-h100", 2, cpu="208", memory="2Ti", gpu_product=H100, gpus=8, gpu_memory_mib=81559),
    NodePool("gpu-l40s", 2, cpu="64", memory="512Gi", gpu_product=L40S, gpus=4, gpu_memory_mib=46068),
    NodePool("cpu", 1, cpu="16", memory="64Gi"),
)


# Node InternalIPs (and kwok's pod CIDR, see cluster.py) are fake addresses that exist only in API
# objects: nothing listens there and no test may send traffic to them.
NODE_IP_BASE = "10.0.0."


def build_node(pool: NodePool, index: int, ordinal: int = 0) -> dict[str, Any]:
    """The Node object for one member of `pool`, status included: kwok's node-initialize stage
    keeps the capacity, allocatable and addresses given here and adds conditions and nodeInfo.
    `ordinal` (unique across the cluster) picks the node's InternalIP."""
    name = f"{pool.name}-{index}"
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": pool.name,
        "type": "kwok",
    }
    resources = {"cpu": pool.cpu, "memory": pool.memory, "pods": str(pool.pods), "ephemeral-storage": "1Ti"}
    taints: list[dict[str, str]] = []
    if pool.gpu_product is not None:
        labels |= {
            GPU_PRODUCT_LABEL: pool.gpu_product,
            "nvidia.com/gpu.count": str(pool.gpus),
            "nvidia.com/gpu.memory": str(pool.gpu_memory_mib),
            "nvidia.com/gpu.present": "true",
        }
        resources[GPU_RESOURCE] = str(pool.gpus)
        taints.append(dict(GPU_TAINT))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE},
        },
        "spec": {"taints": taints} if taints else {},
        "status": {
            "capacity": dict(resources),
            "allocatable": dict(resources),
            "addresses": [
                {"type": "InternalIP", "address": f"{NODE_IP_BASE}{10 + ordinal}"},
                {"type": "Hostname", "address": name},
            ],
        },
    }


def build_nodes(pools: tuple[NodePool, ...] = DEFAULT_POOLS) -> list[dict[str, Any]]:
    """Every Node object of `pools`, in pool order."""
    members = [(pool, i) for pool in pools for i in range(pool.count)]
    return [build_node(pool, i, ordinal) for ordinal, (pool, i) in enumerate(members)]
