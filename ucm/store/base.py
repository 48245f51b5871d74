"""The store interface every layer above builds on (connector, router affinity, sparse offload).

Semantics, shared by every implementation:

* A *key* is an opaque byte string (at least 16 bytes) naming one stored object: the KV of one
  token block for one KV-head group, as produced by `ucm.hashing`. Keys are content addresses:
  two writers that dump the same key dump the same bytes, so a dump of an existing key is a no-op
  and the first complete write wins.
* A *payload* is a flat run of bytes described by a `BlockLayout` (dtype and shape). Loads verify
  that the stored layout equals the expected one; a mismatch is a miss, never a reinterpretation.
* `lookup` and `lookup_prefix` are hints: a block seen by lookup may be evicted before it is
  loaded. Only the per-block result of a finished `load` says whether the bytes in the caller's
  buffer are valid; callers must recompute blocks whose load failed.
* `load` and `dump` are asynchronous and return a `Task`; buffers must stay alive and unmodified
  (dump) or untouched (load) until the task is done.
* Failures never raise out of `load`/`dump` for a single bad block: they are per-block `False`
  results plus counters in `stats()`. Configuration errors (a path that cannot be a store) raise
  `StoreError` at construction, naming the path and what was expected.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Protocol

Key = bytes


class StoreError(Exception):
    """A store cannot be used as configured; the message names the path and the reason."""


class BlocksMissing(StoreError):
    """A read found blocks missing (or damaged) in the store; `block_hashes` names them, so a
    caller can go on without exactly those."""

    def __init__(self, message: str, block_hashes: Sequence[bytes]) -> None:
        super().__init__(message)
        self.block_hashes = tuple(block_hashes)


class WritableBuffer(Protocol):
    """Anything exposing the buffer protocol (bytearray, memoryview, numpy array, CPU tensor via
    `.numpy()`); payloads are read from / written to its bytes in place."""

    def __buffer__(self, flags: int, /) -> memoryview: ...


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """What a payload's bytes mean: element dtype name (e.g. "bfloat16") and shape.

    The layout is written into every object's header, so a reader with a different idea of the
    payload (another dtype, head group or block size) gets a miss instead of wrong KV.
    """

    dtype: str
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for dim in self.shape:
            n *= dim
        return n

    def describe(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


@dataclasses.dataclass
class StoreStats:
    """Counters since the store object was created, plus the current on-store footprint."""

    blocks: int = 0  # objects currently stored (as far as this store knows)
    bytes: int = 0  # bytes currently stored
    capacity_bytes: int | None = None
    lookups: int = 0
    hits: int = 0  # lookups that found the block
    misses: int = 0
    loads: int = 0  # blocks loaded successfully
    load_failures: int = 0  # blocks whose load failed (missing, corrupt, wrong layout or salt)
    corrupt: int = 0  # objects found damaged and quarantined/removed
    dumps: int = 0  # blocks written
    dump_skipped: int = 0  # blocks already present (no-op)
    dump_failures: int = 0
    evictions: int = 0
    loaded_bytes: int = 0
    dumped_bytes: int = 0
    read_only_reason: str | None = None  # set once dumps are refused (ENOSPC, EACCES, EROFS)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Task(abc.ABC):
    """A batch of loads or dumps in flight."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once every block of the batch has finished (successfully or not)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> list[bool]:
        """Block until done (or `TimeoutError`); per-block success, in request order."""


class Store(abc.ABC):
    """A content-addressed store of KV block payloads."""

    @abc.abstractmethod
    def lookup(self, keys: Sequence[Key]) -> list[bool]:
        """Whether each key is present (a hint; see module docstring)."""

    def lookup_prefix(self, keys: Sequence[Key]) -> int:
        """Number of leading keys that are present: the reusable prefix of a chained-hash sequence."""
        for i, present in enumerate(self.lookup(keys)):
            if not present:
                return i
        return len(keys)

    @abc.abstractmethod
    def load(self, keys: Sequence[Key], buffers: Sequence[WritableBuffer], layout: BlockLayout) -> Task:
        """Read each key's payload into the matching buffer (of `layout.nbytes` bytes)."""

    @abc.abstractmethod
    def dump(self, keys: Sequence[Key], buffers: Sequence[WritableBuffer], layout: BlockLayout) -> Task:
        """Write each buffer as the payload of the matching key; existing keys are skipped."""

    @abc.abstractmethod
    def remove(self, keys: Sequence[Key]) -> int:
        """Remove the keys that exist; returns how many were removed."""

    @abc.abstractmethod
    def touch(self, keys: Sequence[Key]) -> int:
        """Mark the keys that exist as just used, so eviction and `ucm store gc` (least recently
        used first) take other objects before them; returns how many exist. For KV that must stay
        readable although nobody reads it for a while (sparse offload's blocks of a request that
        is still decoding)."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of the counters."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads and files; the store must not be used afterwards."""
