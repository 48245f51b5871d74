"""Capacity: usage stays under the limit and the least recently used objects go first."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
from store_helpers import LAYOUT, payload_for, random_keys

from ucm.store import FileStore
from ucm.store.format import HEADER_SIZE, object_path
from ucm.store.scan import scan_objects

MakeStore = Callable[..., FileStore]
OBJECT = HEADER_SIZE + LAYOUT.nbytes


def _on_disk(store: FileStore) -> int:
    objects, _ = scan_objects(os.path.join(store.root, "objects"))
    return sum(o.size for o in objects)


def _dump_one_by_one(store: FileStore, keys: list[bytes]) -> None:
    for key in keys:
        assert store.dump([key], [payload_for(key)], LAYOUT).wait(10) == [True]
        time.sleep(0.003)  # distinct mtimes (kernel timestamps are jiffy-granular)


def test_usage_stays_under_capacity(make_store: MakeStore) -> None:
    capacity = 10 * OBJECT
    store = make_store(capacity_bytes=capacity)
    for _ in range(6):
        keys = random_keys(7)
        assert store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True] * 7
        assert _on_disk(store) <= capacity
        assert store.stats().bytes <= capacity
    assert store.stats().evictions >= 30


def test_least_recently_used_is_evicted(make_store: MakeStore) -> None:
    store = make_store(capacity_bytes=5 * OBJECT, touch_interval_s=0)
    keys = random_keys(5)
    _dump_one_by_one(store, keys)
    # read the two oldest: they become the most recently used
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    for key in keys[:2]:
        assert store.load([key], [out], LAYOUT).wait(10) == [True]
        time.sleep(0.003)
    newcomer = random_keys(1)
    _dump_one_by_one(store, newcomer)  # 6 objects > 5: evict down to 90% of 5 minus one, i.e. 3 remain + 1
    present = dict(zip(keys + newcomer, store.lookup(keys + newcomer), strict=True))
    assert present[keys[0]] and present[keys[1]] and present[newcomer[0]]
    assert not present[keys[2]] and not present[keys[3]]  # the least recently used went first
    assert _on_disk(store) <= 5 * OBJECT


def test_eviction_sees_objects_of_other_processes(make_store: MakeStore) -> None:
    writer = make_store()
    others = random_keys(6)
    _dump_one_by_one(writer, others)
    store = make_store(capacity_bytes=8 * OBJECT)
    _dump_one_by_one(store, random_keys(4))
    assert _on_disk(store) <= 8 * OBJECT
    assert store.lookup(others[:2]) == [False, False]  # the oldest belonged to the other writer


def test_block_larger_than_capacity_is_refused(make_store: MakeStore) -> None:
    store = make_store(capacity_bytes=OBJECT // 2)
    key = random_keys(1)
    assert store.dump(key, [payload_for(key[0])], LAYOUT).wait(10) == [False]
    assert store.stats().dump_failures == 1 and _on_disk(store) == 0


def test_touch_keeps_objects_nobody_reads_from_eviction(make_store: MakeStore) -> None:
    """`touch` (sparse offload's keep-alive) makes objects the most recently used without reading
    them, counts only those that exist, and drops a vanished one from the index."""
    store = make_store(capacity_bytes=5 * OBJECT)
    keys = random_keys(5)
    _dump_one_by_one(store, keys)
    never_stored = random_keys(1)[0]
    time.sleep(0.003)
    assert store.touch([*keys[:2], never_stored]) == 2
    assert store.touch([]) == 0
    newcomer = random_keys(1)
    _dump_one_by_one(store, newcomer)
    present = dict(zip(keys + newcomer, store.lookup(keys + newcomer), strict=True))
    assert present[keys[0]] and present[keys[1]] and present[newcomer[0]]
    assert not present[keys[2]] and not present[keys[3]]
    # an object another host removed: touch finds it gone and the index forgets it
    os.unlink(object_path(os.path.join(store.root, "objects"), keys[0]))
    indexed = store.stats().blocks
    assert store.touch([keys[0], keys[1]]) == 1
    assert store.stats().blocks == indexed - 1
    assert store.lookup([keys[0]]) == [False]
