"""Damaged and foreign objects are misses: counted, quarantined, never returned."""

from __future__ import annotations

import os
import pathlib
import struct
from collections.abc import Callable

import numpy as np
import pytest
import xxhash
from store_helpers import LAYOUT, SALT, payload_for, random_keys

from ucm.store import BlockLayout, FileStore
from ucm.store.format import HEADER_SIZE, Header, object_path

MakeStore = Callable[..., FileStore]


def _stored(make_store: MakeStore, direct: bool = False) -> tuple[FileStore, bytes, str]:
    store = make_store(direct=direct)
    key = random_keys(1)[0]
    assert store.dump([key], [payload_for(key)], LAYOUT).wait(10) == [True]
    return store, key, object_path(os.path.join(store.root, "objects"), key)


def _load_fails_and_quarantines(store: FileStore, key: bytes, path: str) -> None:
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    assert store.load([key], [out], LAYOUT).wait(10) == [False]
    stats = store.stats()
    assert stats.corrupt == 1 and stats.load_failures == 1 and stats.loads == 0
    assert not os.path.exists(path)
    assert len(os.listdir(os.path.join(store.root, "quarantine"))) == 1
    assert store.lookup([key]) == [False]


def _rewrite(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize(
    "where", ["payload-start", "payload-end", "header-key", "header-padding", "header-checksum"]
)
def test_flipped_byte_detected(make_store: MakeStore, direct: bool, where: str) -> None:
    store, key, path = _stored(make_store, direct)
    offset = {
        "payload-start": HEADER_SIZE,
        "payload-end": HEADER_SIZE + LAYOUT.nbytes - 1,
        "header-key": 30,
        "header-padding": 4000,  # covered by the header checksum since format version 2
        "header-checksum": HEADER_SIZE - 1,
    }[where]
    data = bytearray(pathlib.Path(path).read_bytes())
    data[offset] ^= 0x01
    _rewrite(path, bytes(data))
    _load_fails_and_quarantines(store, key, path)


def test_every_header_byte_is_protected(make_store: MakeStore) -> None:
    """Flip each of the 4,096 header bytes in turn (all 8 bits): every flip is a counted,
    quarantined miss, padding included, so a field added to the padding later is covered."""
    store, key, path = _stored(make_store)
    good = pathlib.Path(path).read_bytes()
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    loaded = []
    for offset in range(HEADER_SIZE):
        damaged = bytearray(good)
        damaged[offset] ^= 0xFF
        _rewrite(path, bytes(damaged))
        if store.load([key], [out], LAYOUT).wait(10) != [False] or os.path.exists(path):
            loaded.append(offset)
    assert not loaded, f"header bytes whose damage went unnoticed: {loaded[:20]}"
    stats = store.stats()
    assert stats.corrupt == HEADER_SIZE and stats.load_failures == HEADER_SIZE and stats.loads == 0
    assert len(os.listdir(os.path.join(store.root, "quarantine"))) == HEADER_SIZE
    _rewrite(path, good)  # and the undamaged object still loads
    assert store.load([key], [out], LAYOUT).wait(10) == [True]
    assert np.array_equal(out, payload_for(key))


def _version_1_header(key: bytes, payload_len: int, checksum: int) -> bytes:
    """A header as format version 1 wrote it: the checksum right after the fields, over them only."""
    fields = struct.pack(
        "<8sHH16sH64sH256sQQ", b"UCMKVOBJ", 1, HEADER_SIZE, SALT, len(key), key,
        len(LAYOUT.describe()), LAYOUT.describe().encode(), payload_len, checksum,
    )
    header = fields + struct.pack("<Q", xxhash.xxh3_64_intdigest(fields))
    return header + bytes(HEADER_SIZE - len(header))


def test_objects_of_format_version_1_are_clean_misses(make_store: MakeStore) -> None:
    """Version 1 left the header padding unchecked; its objects are misses (quarantined, so the
    next dump rewrites them in the current format), never loaded."""
    store, key, path = _stored(make_store)
    payload = payload_for(key).tobytes()
    _rewrite(path, _version_1_header(key, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload)
    _load_fails_and_quarantines(store, key, path)
    assert store.dump([key], [payload_for(key)], LAYOUT).wait(10) == [True]
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    assert store.load([key], [out], LAYOUT).wait(10) == [True]
    assert np.array_equal(out, payload_for(key))


@pytest.mark.parametrize("length", [0, 100, HEADER_SIZE, HEADER_SIZE + LAYOUT.nbytes - 1])
def test_truncated_object(make_store: MakeStore, length: int) -> None:
    store, key, path = _stored(make_store)
    os.truncate(path, length)
    _load_fails_and_quarantines(store, key, path)


def test_foreign_format(make_store: MakeStore) -> None:
    store, key, path = _stored(make_store)
    _rewrite(path, b"PK\x03\x04 some zip file" + bytes(HEADER_SIZE + LAYOUT.nbytes))
    _load_fails_and_quarantines(store, key, path)


def test_wrong_salt(make_store: MakeStore) -> None:
    store, key, path = _stored(make_store)
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    # an object written by a deployment with another salt, sitting under our key's name
    payload = payload_for(key).tobytes()
    header = Header(b"\xff" * 16, key, LAYOUT.describe(), len(payload), xxhash.xxh3_64_intdigest(payload))
    _rewrite(path, header.encode() + payload)
    assert store.load([key], [out], LAYOUT).wait(10) == [False]
    assert store.stats().corrupt == 1 and not os.path.exists(path)


def test_object_under_the_wrong_name(make_store: MakeStore) -> None:
    store, _, path = _stored(make_store)
    alias = random_keys(1)[0]
    alias_path = object_path(os.path.join(store.root, "objects"), alias)
    os.makedirs(os.path.dirname(alias_path), exist_ok=True)
    os.rename(path, alias_path)
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    assert store.load([alias], [out], LAYOUT).wait(10) == [False]
    assert store.stats().corrupt == 1 and not os.path.exists(alias_path)


def test_wrong_layout_is_a_miss_but_not_damage(make_store: MakeStore) -> None:
    store, key, path = _stored(make_store)
    other_layout = BlockLayout("float16", LAYOUT.shape, 2)  # same size, other meaning
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    assert store.load([key], [out], other_layout).wait(10) == [False]
    smaller = BlockLayout("bfloat16", (2, 4, 500), 2)
    assert store.load([key], [np.zeros(smaller.nbytes, np.uint8)], smaller).wait(10) == [False]
    stats = store.stats()
    assert stats.corrupt == 0 and stats.load_failures == 2
    assert os.path.exists(path)  # valid for readers that expect its layout
    assert store.load([key], [out], LAYOUT).wait(10) == [True]
    assert np.array_equal(out, payload_for(key))


def test_missing_key_is_a_plain_miss(make_store: MakeStore) -> None:
    store = make_store()
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    assert store.load(random_keys(1), [out], LAYOUT).wait(10) == [False]
    assert store.stats().corrupt == 0 and store.stats().load_failures == 1


def test_salt_is_checked_per_object_not_per_directory(make_store: MakeStore) -> None:
    """Two deployments (salts) may share one directory; each sees only its own objects."""
    mine, key, _ = _stored(make_store)
    theirs = make_store(salt=SALT[::-1])
    their_key = random_keys(1)[0]
    assert theirs.dump([their_key], [payload_for(their_key)], LAYOUT).wait(10) == [True]
    out = np.zeros(LAYOUT.nbytes, np.uint8)
    assert theirs.load([their_key], [out], LAYOUT).wait(10) == [True]
    assert mine.load([key], [out], LAYOUT).wait(10) == [True]


@pytest.mark.parametrize("direct", [False, True])
def test_large_blocks_verified_off_thread(make_store: MakeStore, direct: bool) -> None:
    """Blocks >= 256 KiB are checksummed on a verify thread (overlapping I/O): same guarantees."""
    big = BlockLayout("bfloat16", (1000, 301), 2)  # 602,000 bytes: large and not 4096-aligned
    store = make_store(direct=direct)
    keys = random_keys(6)
    assert store.dump(keys, [payload_for(k, big.nbytes) for k in keys], big).wait(10) == [True] * 6
    objects = os.path.join(store.root, "objects")
    damaged = object_path(objects, keys[2])
    data = bytearray(pathlib.Path(damaged).read_bytes())
    data[HEADER_SIZE + 500_000] ^= 0x80
    _rewrite(damaged, bytes(data))
    os.truncate(object_path(objects, keys[4]), HEADER_SIZE + 300_000)
    out = [np.zeros(big.nbytes, np.uint8) for _ in keys]
    task = store.load(keys, out, big)
    assert task.wait(10) == [True, True, False, True, False, True] and task.done()
    for i in (0, 1, 3, 5):
        assert np.array_equal(out[i], payload_for(keys[i], big.nbytes))
    assert store.stats().corrupt == 2 and len(os.listdir(os.path.join(store.root, "quarantine"))) == 2
