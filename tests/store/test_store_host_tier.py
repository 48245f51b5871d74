"""HostTierStore: memory hits, write-through, bounded LRU, and the Store semantics through it."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from store_helpers import LAYOUT, SALT, payload_for, random_keys

from ucm.store import BlockLayout, FileStore, HostTierStore, StoreError, StoreOptions, open_store

MakeStore = Callable[..., FileStore]


def _load(store: HostTierStore | FileStore, keys: list[bytes], layout: BlockLayout = LAYOUT) -> list[bool]:
    out = [np.zeros(layout.nbytes, np.uint8) for _ in keys]
    results = store.load(keys, out, layout).wait(10)
    for key, buf, ok in zip(keys, out, results, strict=True):
        if ok:
            assert np.array_equal(buf, payload_for(key, layout.nbytes))
    return results


def test_write_through_and_memory_hits(make_store: MakeStore) -> None:
    backing = make_store()
    tier = HostTierStore(backing, capacity_bytes=4 * LAYOUT.nbytes)
    keys = random_keys(3)
    assert tier.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True] * 3
    assert backing.lookup(keys) == [True] * 3  # written through
    assert _load(tier, keys) == [True] * 3
    assert tier.memory_stats()["hits"] == 3
    assert backing.stats().loads == 0  # served from memory, the disk was not read


def test_misses_populate_memory(make_store: MakeStore) -> None:
    backing = make_store()
    keys = random_keys(2)
    backing.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10)
    tier = HostTierStore(backing, capacity_bytes=4 * LAYOUT.nbytes)
    assert _load(tier, keys + random_keys(1)) == [True, True, False]
    assert backing.stats().loads == 2
    assert _load(tier, keys) == [True, True]
    assert backing.stats().loads == 2 and tier.memory_stats()["hits"] == 2
    assert tier.stats().loads == 4 and tier.stats().load_failures == 1


def test_bounded_lru(make_store: MakeStore) -> None:
    backing = make_store()
    tier = HostTierStore(backing, capacity_bytes=3 * LAYOUT.nbytes)
    keys = random_keys(4)
    for key in keys[:3]:
        tier.dump([key], [payload_for(key)], LAYOUT).wait(10)
    _load(tier, keys[:1])  # keys[0] becomes most recently used
    tier.dump(keys[3:], [payload_for(keys[3])], LAYOUT).wait(10)
    mem = tier.memory_stats()
    assert mem["blocks"] == 3 and mem["bytes"] <= 3 * LAYOUT.nbytes
    backing.remove(keys)  # now only memory can answer
    assert tier.lookup(keys) == [True, False, True, True]  # keys[1] was the LRU victim
    assert _load(tier, keys) == [True, False, True, True]


def test_layout_is_checked_in_memory_too(make_store: MakeStore) -> None:
    tier = HostTierStore(make_store(), capacity_bytes=4 * LAYOUT.nbytes)
    key = random_keys(1)
    tier.dump(key, [payload_for(key[0])], LAYOUT).wait(10)
    other = BlockLayout("float16", LAYOUT.shape, 2)
    out = np.zeros(other.nbytes, np.uint8)
    assert tier.load(key, [out], other).wait(10) == [False]


def test_serves_from_memory_when_backing_refuses_dumps(make_store: MakeStore) -> None:
    backing = make_store(capacity_bytes=100)  # every block is larger than the disk budget
    tier = HostTierStore(backing, capacity_bytes=4 * LAYOUT.nbytes)
    key = random_keys(1)
    assert tier.dump(key, [payload_for(key[0])], LAYOUT).wait(10) == [False]  # the backing result
    assert _load(tier, key) == [True]
    assert tier.lookup_prefix(key) == 1


def test_remove_and_prefix(make_store: MakeStore) -> None:
    tier = HostTierStore(make_store(), capacity_bytes=8 * LAYOUT.nbytes)
    keys = random_keys(5)
    tier.dump(keys[:3], [payload_for(k) for k in keys[:3]], LAYOUT).wait(10)
    assert tier.lookup_prefix(keys) == 3
    assert tier.remove(keys[1:2]) == 1
    assert tier.lookup_prefix(keys) == 1
    assert tier.memory_stats()["blocks"] == 2
    assert tier.touch(keys) == 2  # the backing store's objects: its eviction clock is the shared one


def test_open_store(store_dir: os.PathLike[str]) -> None:
    plain = open_store(store_dir, StoreOptions(salt=SALT))
    assert isinstance(plain, FileStore)
    plain.close()
    tiered = open_store(store_dir, StoreOptions(salt=SALT, host_tier_bytes=1 << 20))
    assert isinstance(tiered, HostTierStore) and isinstance(tiered.backing, FileStore)
    tiered.close()
    with pytest.raises(StoreError, match="host_tier_bytes"):
        open_store(store_dir, StoreOptions(salt=SALT, host_tier_bytes=-1))
    with pytest.raises(StoreError, match="capacity_bytes"):
        HostTierStore(plain, 0)
