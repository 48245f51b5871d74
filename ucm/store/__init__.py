"""The UCM store: a content-addressed store of KV block payloads (see `ucm.store.base`).

`open_store` is the one way higher layers build a store from configuration: a `FileStore` on
a directory, optionally behind a `HostTierStore` (host-memory LRU).
"""

from __future__ import annotations

import os
from typing import Any

from ucm.store.base import BlockLayout, Store, StoreError, StoreStats, Task
from ucm.store.file_store import FileStore
from ucm.store.host_tier import HostTierStore

__all__ = [
    "BlockLayout",
    "FileStore",
    "HostTierStore",
    "Store",
    "StoreError",
    "StoreStats",
    "Task",
    "open_store",
]


def open_store(path: str | os.PathLike[str], *, host_tier_bytes: int = 0, **options: Any) -> Store:
    """A FileStore at `path` (options: salt, capacity_bytes, durability, direct, io_threads),
    behind a host-memory tier of `host_tier_bytes` when that is > 0."""
    if host_tier_bytes < 0:
        raise StoreError(f"host_tier_bytes must be >= 0, got {host_tier_bytes}")
    store: Store = FileStore(path, **options)
    if host_tier_bytes:
        store = HostTierStore(store, host_tier_bytes)
    return store
