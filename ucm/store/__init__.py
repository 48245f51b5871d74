"""The UCM store: a content-addressed store of KV block payloads (see `ucm.store.base`).

`open_store` is the one way higher layers build a store from configuration: a `FileStore` on
a directory, optionally behind a `HostTierStore` (host-memory LRU).
"""

from __future__ import annotations

import os

from ucm.store.base import BlockLayout, Store, StoreError, StoreStats, Task
from ucm.store.file_store import FileStore
from ucm.store.host_tier import HostTierStore
from ucm.store.options import DURABILITIES, StoreOptions

__all__ = [
    "DURABILITIES",
    "BlockLayout",
    "FileStore",
    "HostTierStore",
    "Store",
    "StoreError",
    "StoreOptions",
    "StoreStats",
    "Task",
    "open_store",
]


def open_store(path: str | os.PathLike[str], options: StoreOptions) -> Store:
    """A FileStore at `path`, behind a host-memory tier when `options.host_tier_bytes` > 0."""
    if options.host_tier_bytes < 0:
        raise StoreError(f"host_tier_bytes must be >= 0, got {options.host_tier_bytes}")
    store: Store = FileStore(
        path, salt=options.salt, capacity_bytes=options.capacity_bytes, durability=options.durability,
        direct=options.direct, io_threads=options.io_threads,
    )
    if options.host_tier_bytes:
        store = HostTierStore(store, options.host_tier_bytes)
    return store
