"""What a store is opened with: the one typed object between configuration and `open_store`.

The accepted values live here, with the layer that enforces them, so the connector's config
parser and the store cannot drift apart (the connector imports `DURABILITIES` from here).
"""

from __future__ import annotations

import dataclasses

# "none": a published block is whole (atomic rename) but a host crash may lose it; "fsync": it
# survives a crash too, at a cost in dump bandwidth.
DURABILITIES = ("none", "fsync")


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    """How to open a store; see `ucm.store.file_store.FileStore` for each field's effect."""

    salt: bytes  # the 16-byte CacheIdentity digest every object carries
    capacity_bytes: int | None = None  # None: unbounded
    durability: str = "none"  # one of DURABILITIES
    direct: bool = False  # O_DIRECT file I/O
    io_threads: int = 8
    host_tier_bytes: int = 0  # > 0: a host-memory LRU tier in front of the files
