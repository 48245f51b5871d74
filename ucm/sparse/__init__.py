"""Training-free sparse attention for UCM: a hook framework, block retrieval, offload to the store.

The connector calls `create_sparse(ucm_sparse_config, role, vllm_config)` when its extra config
has `ucm_sparse_config`, then forwards the hooks of `UcmSparseBase`.
"""

from ucm.sparse.active import get_active_sparse
from ucm.sparse.base import SlotAllocation, SparseConfigError, SparseRole, UcmSparseBase
from ucm.sparse.registry import (
    create_sparse,
    register_sparse,
    registered_names,
    shutdown_sparse,
)

__all__ = [
    "SlotAllocation",
    "SparseConfigError",
    "SparseRole",
    "UcmSparseBase",
    "create_sparse",
    "get_active_sparse",
    "register_sparse",
    "registered_names",
    "shutdown_sparse",
]
