"""A host-memory LRU tier in front of any `Store`.

Why: a block that was just written or read is likely read again soon (shared prefixes, the
decode side of a PD pair on the same node); serving it from host memory skips the disk and
its checksum. Semantics are those of `Store`:

* `load`: blocks held in memory (with the same layout) are copied into the caller's buffers
  at once; the rest go to the backing store, and those that load successfully are copied into
  memory when the task is waited on.
* `dump`: write-through. The bytes are copied into memory at submission (so the tier serves
  them even if the backing store refuses dumps, e.g. a full disk) and the backing dump runs
  as usual; the task reports the backing store's result.
* Capacity: total payload bytes in memory never exceed `capacity_bytes`; least recently used
  blocks (by load, lookup hit or dump) are dropped first. A block larger than the capacity is
  never cached.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

from ucm.store import fileio
from ucm.store.base import BlockLayout, Key, Store, StoreError, StoreStats, Task, WritableBuffer
from ucm.store.checks import check_batch
from ucm.store.tasks import CombinedTask


class HostTierStore(Store):
    def __init__(self, backing: Store, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise StoreError(f"host tier capacity_bytes must be positive, got {capacity_bytes}")
        self.backing = backing
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[bytes, tuple[str, bytearray]] = collections.OrderedDict()
        self._bytes = 0
        self._lookups = self._hits = self._memory_hits = 0
        self._loads = self._load_failures = self._loaded_bytes = 0

    # -- memory ---------------------------------------------------------------------------------

    def _get(self, key: bytes, description: str) -> bytearray | None:
        with self._lock:
            entry = self._blocks.get(key)
            if entry is None or entry[0] != description:
                return None
            self._blocks.move_to_end(key)
            return entry[1]

    def _put(self, key: bytes, description: str, src: memoryview) -> None:
        size = src.nbytes
        if size > self.capacity_bytes:
            return
        copy = bytearray(size)
        fileio.copy_bytes(memoryview(copy), src)
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            while self._blocks and self._bytes + size > self.capacity_bytes:
                _, (_, dropped) = self._blocks.popitem(last=False)
                self._bytes -= len(dropped)
            self._blocks[key] = (description, copy)
            self._bytes += size

    def memory_stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "blocks": len(self._blocks),
                "bytes": self._bytes,
                "capacity_bytes": self.capacity_bytes,
                "hits": self._memory_hits,
            }

    # -- Store ------------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[Key]) -> list[bool]:
        with self._lock:
            found = [key in self._blocks for key in keys]
            for key, hit in zip(keys, found, strict=True):
                if hit:
                    self._blocks.move_to_end(key)
        rest = [i for i, hit in enumerate(found) if not hit]
        if rest:
            for i, hit in zip(rest, self.backing.lookup([keys[i] for i in rest]), strict=True):
                found[i] = hit
        with self._lock:
            self._lookups += len(keys)
            self._hits += sum(found)
        return found

    def lookup_prefix(self, keys: Sequence[Key]) -> int:
        with self._lock:
            count = 0
            while count < len(keys) and keys[count] in self._blocks:
                count += 1
        return count + (self.backing.lookup_prefix(keys[count:]) if count < len(keys) else 0)

    def load(self, keys: Sequence[Key], buffers: Sequence[WritableBuffer], layout: BlockLayout) -> Task:
        views = check_batch(keys, buffers, layout, writable=True)
        description = layout.describe()
        known: list[bool | None] = []
        missing: list[int] = []
        for i, (key, view) in enumerate(zip(keys, views, strict=True)):
            cached = self._get(key, description)
            if cached is not None and len(cached) == view.nbytes:
                fileio.copy_bytes(view, memoryview(cached))
                known.append(True)
            else:
                known.append(None)
                missing.append(i)
        with self._lock:
            self._memory_hits += len(keys) - len(missing)
        inner = (
            self.backing.load([keys[i] for i in missing], [buffers[i] for i in missing], layout)
            if missing
            else None
        )

        def finish(result: list[bool]) -> None:
            for i in missing:
                if result[i]:
                    self._put(keys[i], description, views[i])
            with self._lock:
                self._loads += sum(result)
                self._load_failures += len(result) - sum(result)
                self._loaded_bytes += sum(v.nbytes for v, ok in zip(views, result, strict=True) if ok)

        return CombinedTask(known, inner, missing, finish)

    def dump(self, keys: Sequence[Key], buffers: Sequence[WritableBuffer], layout: BlockLayout) -> Task:
        views = check_batch(keys, buffers, layout, writable=False)
        task = self.backing.dump(keys, buffers, layout)
        description = layout.describe()
        for key, view in zip(keys, views, strict=True):
            self._put(key, description, view)
        return task

    def remove(self, keys: Sequence[Key]) -> int:
        with self._lock:
            for key in keys:
                entry = self._blocks.pop(key, None)
                if entry is not None:
                    self._bytes -= len(entry[1])
        return self.backing.remove(keys)

    def touch(self, keys: Sequence[Key]) -> int:
        """The backing store's eviction clock is the one that matters: host memory is per process."""
        return self.backing.touch(keys)

    def stats(self) -> StoreStats:
        """The backing store's footprint and write counters; lookups and loads as seen through
        this tier (memory hits included). `memory_stats()` has the tier's own numbers."""
        stats = self.backing.stats()
        with self._lock:
            stats.lookups, stats.hits = self._lookups, self._hits
            stats.misses = self._lookups - self._hits
            stats.loads, stats.load_failures = self._loads, self._load_failures
            stats.loaded_bytes = self._loaded_bytes
        return stats

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0
        self.backing.close()
