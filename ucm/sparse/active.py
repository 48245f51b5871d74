"""The one active sparse algorithm per process role: what vLLM's attention hook looks up.

Why its own module: the registry makes an instance active (`create_sparse`) and the vLLM patch asks
for it on every attention call (`get_active_sparse`); both depend on this table, so neither has to
import the other. Writers (the registry's create/shutdown) serialize under the registry's lock; a
lookup is one dict read, safe without it.
"""

from __future__ import annotations

from ucm.sparse.base import SparseRole, UcmSparseBase

_ACTIVE: dict[SparseRole, UcmSparseBase] = {}


def get_active_sparse(role: object) -> UcmSparseBase | None:
    """The active instance of `role` in this process, or None (dense attention)."""
    return _ACTIVE.get(SparseRole.parse(role))


def set_active_sparse(role: SparseRole, instance: UcmSparseBase) -> None:
    _ACTIVE[role] = instance


def pop_active_sparse(role: SparseRole) -> UcmSparseBase | None:
    """Forget the active instance of `role`, returning it (None when there was none)."""
    return _ACTIVE.pop(role, None)


def active_roles() -> list[SparseRole]:
    return list(_ACTIVE)
