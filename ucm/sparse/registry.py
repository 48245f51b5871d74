"""Registry of sparse algorithms by name, and the one active instance per process role.

Why lazy (name -> "module:Class"): choosing an algorithm by name from `ucm_sparse_config` must not
import every algorithm (and its dependencies) into every vLLM process.

Why one active instance per role: the attention hooks are called from inside vLLM's attention
backend, which knows nothing about connectors; it asks `get_active_sparse(SparseRole.WORKER)`.
Two different algorithms in one process would make that answer ambiguous, so that is an error.
The table of active instances is `ucm.sparse.active`, which the vLLM patch reads too.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from typing import Any

from ucm.sparse.active import active_roles, get_active_sparse, pop_active_sparse, set_active_sparse
from ucm.sparse.base import SparseConfigError, SparseRole, UcmSparseBase

__all__ = ["algorithm_class", "create_sparse", "get_active_sparse", "register_sparse", "registered_names",
           "shutdown_sparse"]

_REGISTRY: dict[str, str] = {
    "block_retrieval": "ucm.sparse.block_retrieval:BlockRetrievalSparse",
    # window extrapolation replaces attention through the same hook (the connector's ucm_window_config)
    "rerope": "ucm.window.algorithm:ReRopeAttention",
    "blend": "ucm.blend.algorithm:CacheBlend",
}
_LOCK = threading.Lock()  # create/shutdown: check-then-set of the active table (ucm.sparse.active)


def register_sparse(name: str, target: str) -> None:
    """Register an algorithm class given as "package.module:ClassName" under `name`."""
    if ":" not in target:
        raise ValueError(f"sparse algorithm {name!r}: target must be 'module:Class', got {target!r}")
    _REGISTRY[name] = target


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def algorithm_class(name: str) -> type[UcmSparseBase]:
    """The class registered as `name`; the error lists the accepted names."""
    target = _REGISTRY.get(name)
    if target is None:
        raise SparseConfigError(
            f"ucm_sparse_config.name: unknown sparse algorithm {name!r}; accepted: {', '.join(registered_names())}"
        )
    module_name, class_name = target.split(":", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, UcmSparseBase)):
        raise SparseConfigError(f"ucm_sparse_config.name: {target} is not a UcmSparseBase subclass")
    return cls


def create_sparse(config: Mapping[str, object], role: object, vllm_config: Any = None) -> UcmSparseBase:
    """Build the algorithm named by `config["name"]` for `role` and make it this process's active one.

    `config` is the connector's `ucm_sparse_config` object; `role` is "scheduler"/"worker" or vLLM's
    KVConnectorRole. On the worker side with a `vllm_config`, vLLM's attention backends are
    hooked (`vllm_patch.install_attention_hooks`). A second call for the same role with the same algorithm replaces the active
    instance (a connector re-created in one process); with a different algorithm it is an error.
    """
    if not isinstance(config, Mapping):
        raise SparseConfigError(f"ucm_sparse_config: expected an object, got {type(config).__name__}")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise SparseConfigError(
            f"ucm_sparse_config.name: required string naming the algorithm; accepted: {', '.join(registered_names())}"
        )
    sparse_role = SparseRole.parse(role)
    cls = algorithm_class(name)
    parsed = cls.parse_config({k: v for k, v in config.items() if k != "name"})
    with _LOCK:
        current = get_active_sparse(sparse_role)
        if current is not None and current.name != cls.name:
            raise SparseConfigError(
                f"ucm_sparse_config.name: {name!r} requested but {current.name!r} is already active in this "
                f"process ({sparse_role.value} side); one sparse algorithm per process"
            )
        if sparse_role is SparseRole.WORKER and vllm_config is not None:
            # inside a vLLM worker: hook attention (refuses any vLLM but the pinned version).
            # Function-level: vllm_patch loads torch and vLLM's attention backends, which the
            # scheduler side and config validation (this module without a vllm_config) must not need.
            from ucm.sparse.vllm_patch import install_attention_hooks

            install_attention_hooks()
        instance = cls(parsed, sparse_role, vllm_config)
        if current is not None:
            current.close()
        set_active_sparse(sparse_role, instance)
    return instance


def shutdown_sparse(role: object | None = None) -> None:
    """Close and forget the active instance of `role` (all roles when None)."""
    with _LOCK:
        roles = active_roles() if role is None else [SparseRole.parse(role)]
        for r in roles:
            instance = pop_active_sparse(r)
            if instance is not None:
                instance.close()
