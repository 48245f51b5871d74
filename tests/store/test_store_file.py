"""FileStore semantics: round trips, no-op rewrites, lookups, removal and configuration errors."""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from store_helpers import LAYOUT, SALT, payload_for, random_keys

from ucm.store import BlockLayout, FileStore, StoreError, file_store
from ucm.store.format import HEADER_SIZE, object_path

MakeStore = Callable[..., FileStore]


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("durability", ["none", "fsync"])
def test_round_trip_bit_exact(make_store: MakeStore, direct: bool, durability: str) -> None:
    store = make_store(direct=direct, durability=durability)
    keys = random_keys(12)
    payloads = [payload_for(k) for k in keys]
    assert store.dump(keys, payloads, LAYOUT).wait(10) == [True] * 12
    # a second process's view: a fresh store object over the same directory
    other = make_store(direct=not direct)
    assert other.stats().blocks == 12
    out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in keys]
    assert other.load(keys, out, LAYOUT).wait(10) == [True] * 12
    for got, want in zip(out, payloads, strict=True):
        assert np.array_equal(got, want)
    stats = other.stats()
    assert stats.loads == 12 and stats.loaded_bytes == 12 * LAYOUT.nbytes and stats.corrupt == 0


def test_direct_with_aligned_buffers(make_store: MakeStore) -> None:
    layout = BlockLayout("uint8", (8192,), 1)
    store = make_store(direct=True)
    keys = random_keys(4)
    src = [np.frombuffer(_aligned(8192), np.uint8) for _ in keys]
    for s, k in zip(src, keys, strict=True):
        s[:] = payload_for(k, 8192)
    assert store.dump(keys, src, layout).wait(10) == [True] * 4
    dst = [np.frombuffer(_aligned(8192), np.uint8) for _ in keys]
    assert store.load(keys, dst, layout).wait(10) == [True] * 4
    assert all(np.array_equal(a, b) for a, b in zip(src, dst, strict=True))


def _aligned(n: int) -> memoryview:
    import mmap

    return memoryview(mmap.mmap(-1, n))


def test_dump_of_existing_key_is_a_noop(make_store: MakeStore) -> None:
    store = make_store()
    keys = random_keys(3)
    assert store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True] * 3
    path = object_path(str(store.root) + "/objects", keys[0])
    before = os.stat(path)
    # the same process skips via its index, another process via link() finding the name taken
    assert store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True] * 3
    other = make_store()
    other._index.clear()
    assert other.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True] * 3
    assert os.stat(path).st_ino == before.st_ino
    assert store.stats().dump_skipped == 3 and other.stats().dump_skipped == 3
    assert not [n for n in _all_names(store.root) if n.endswith(".tmp")]


def _all_names(root: pathlib.Path | str) -> list[str]:
    return [name for _, _, files in os.walk(root) for name in files]


def test_lookup_and_prefix(make_store: MakeStore) -> None:
    store = make_store()
    keys = random_keys(8)
    store.dump(keys[:5], [payload_for(k) for k in keys[:5]], LAYOUT).wait(10)
    assert store.lookup(keys) == [True] * 5 + [False] * 3
    assert store.lookup_prefix(keys) == 5
    assert store.lookup_prefix(keys[5:] + keys[:5]) == 0
    # a block published by another process after our index was built is still found (stat fallback)
    other = make_store()
    late = random_keys(1)
    other.dump(late, [payload_for(late[0])], LAYOUT).wait(10)
    assert store.lookup(late) == [True]
    assert store.lookup_prefix(keys[:5] + late) == 6


def test_remove(make_store: MakeStore) -> None:
    store = make_store()
    keys = random_keys(4)
    store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10)
    assert store.remove(keys[:2] + random_keys(1)) == 2
    assert store.lookup(keys) == [False, False, True, True]
    out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in keys]
    assert store.load(keys, out, LAYOUT).wait(10) == [False, False, True, True]
    assert store.stats().blocks == 2


def test_temp_files_are_invisible(make_store: MakeStore) -> None:
    store = make_store()
    key = random_keys(1)[0]
    leaf = os.path.dirname(object_path(os.path.join(store.root, "objects"), key))
    os.makedirs(leaf)
    with open(os.path.join(leaf, f".{key.hex()}.host.1.abcd.tmp"), "wb") as f:
        f.write(b"\0" * (HEADER_SIZE + LAYOUT.nbytes))
    assert store.lookup([key]) == [False]
    assert make_store().stats().blocks == 0


def test_bad_arguments_raise_naming_the_problem(make_store: MakeStore, tmp_path: pathlib.Path) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="keys"):
        store.lookup([b"short"])
    with pytest.raises(ValueError, match="buffer 0 has 10 bytes"):
        store.dump(random_keys(1), [bytearray(10)], LAYOUT)
    with pytest.raises(ValueError, match="read-only"):
        store.load(random_keys(1), [bytes(LAYOUT.nbytes)], LAYOUT)
    with pytest.raises(ValueError, match="C-contiguous"):
        store.dump(random_keys(1), [np.zeros((LAYOUT.nbytes, 2), np.uint8)[:, 0]], LAYOUT)
    with pytest.raises(ValueError, match="2 keys but 1 buffers"):
        store.load(random_keys(2), [bytearray(LAYOUT.nbytes)], LAYOUT)
    with pytest.raises(StoreError, match="salt"):
        FileStore(tmp_path / "x", salt=b"short")
    with pytest.raises(StoreError, match="durability"):
        FileStore(tmp_path / "x", salt=SALT, durability="sometimes")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        FileStore(afile, salt=SALT)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="foreign directory"):
        FileStore(foreign, salt=SALT)
    (foreign / "ucm-store.json").write_text(json.dumps({"format": "ucm-file-store", "version": 99}))
    with pytest.raises(StoreError, match="version 99"):
        FileStore(foreign, salt=SALT)


def test_direct_on_a_filesystem_without_o_direct(tmp_path: pathlib.Path) -> None:
    shm = pathlib.Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    path = shm / f"ucm-test-{os.getpid()}"
    try:
        try:
            store = FileStore(path, salt=SALT, direct=True)
        except StoreError as exc:
            assert "O_DIRECT" in str(exc) and str(path) in str(exc)
        else:  # tmpfs gained O_DIRECT support in Linux 6.6: then it must simply work
            keys = random_keys(2)
            assert store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True, True]
            store.close()
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def test_startup_logs_path_and_salt(store_dir: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ucm.store")
    FileStore(store_dir, salt=SALT).close()
    assert any(str(store_dir) in r.message and SALT.hex() in r.message for r in caplog.records)


@pytest.mark.parametrize("mode", ["renameat2", "link", "rename"])
def test_every_publish_mode(make_store: MakeStore, mode: str) -> None:
    """Each fallback (no RENAME_NOREPLACE e.g. on NFS; no hard links) publishes complete objects."""
    store = make_store(io_threads=8)
    store._publisher.use_noreplace = mode == "renameat2"
    store._publisher.use_link = mode in ("renameat2", "link")
    keys = random_keys(4)
    batch = keys * 4  # racing writers of the same keys
    assert store.dump(batch, [payload_for(k) for k in batch], LAYOUT).wait(10) == [True] * 16
    stats = store.stats()
    if mode != "rename":  # first writer wins: exactly one publish per key
        assert stats.dumps == 4 and stats.dump_skipped == 12
    reader = make_store()
    out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in keys]
    assert reader.load(keys, out, LAYOUT).wait(10) == [True] * 4
    assert all(np.array_equal(o, payload_for(k)) for o, k in zip(out, keys, strict=True))
    assert not [n for n in _all_names(store.root) if n.endswith(".tmp")]


def test_shards_are_created_up_front(make_store: MakeStore) -> None:
    store = make_store(prepare_shards=True)
    shards = os.listdir(os.path.join(store.root, "objects"))
    assert len(shards) == 4096 and {len(s) for s in shards} == {3}
    keys = random_keys(3)
    assert store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True] * 3
    assert make_store(prepare_shards=True).stats().blocks == 3


def test_rescans_collect_temp_files_of_dead_writers(make_store: MakeStore) -> None:
    store = make_store()
    key = random_keys(1)[0]
    leaf = os.path.dirname(object_path(os.path.join(store.root, "objects"), key))
    os.makedirs(leaf, exist_ok=True)
    old, young = (os.path.join(leaf, f".{key.hex()}.host.{pid}.ab.tmp") for pid in (1, 2))
    for path in (old, young):
        with open(path, "wb") as f:
            f.write(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store.refresh()
    assert not os.path.exists(old) and os.path.exists(young)  # a young one may be a live writer


def test_dump_rewrites_a_block_another_host_removed(make_store: MakeStore) -> None:
    store = make_store()
    keys = random_keys(2)
    store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10)
    make_store().remove(keys[:1])  # another process evicts it; our index still lists it
    assert store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True, True]
    assert store.stats().dumps == 3 and store.stats().dump_skipped == 1
    assert make_store().lookup(keys) == [True, True]


def test_many_keys_are_statted_and_touched_in_parallel_chunks_in_order(make_store: MakeStore) -> None:
    """Beyond 256 keys the index-less stats (lookup) and the metadata writes (touch) run in chunks
    on the I/O threads; each answer still belongs to its own key."""
    writer = make_store()
    keys = random_keys(600)
    assert all(writer.dump(keys[::3], [payload_for(k) for k in keys[::3]], LAYOUT).wait(30))
    reader = make_store(prepare_shards=False)
    reader._index.clear()  # a store that has not scanned yet: every lookup is a stat
    assert reader.lookup(keys) == [i % 3 == 0 for i in range(600)]
    assert reader.touch(keys) == 200


def test_removal_during_a_scan_is_not_undone(make_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan's listing is a snapshot: an object this process removes (or quarantines, or
    evicts) after the listing but before the index is replaced must not come back as a hit
    (found by the damage property test: a reopened store's start-up scan racing the load that
    quarantined a damaged object)."""
    store = make_store()
    keys = random_keys(2)
    assert store.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True, True]
    real_scan = file_store.scan_objects

    def scan_overtaken_by_a_removal(root: str, with_stat: bool = True) -> Any:
        listing = real_scan(root, with_stat)  # still lists both objects
        assert store.remove([keys[0]]) == 1
        return listing

    monkeypatch.setattr(file_store, "scan_objects", scan_overtaken_by_a_removal)
    store.refresh()
    assert store.lookup(keys) == [False, True]
    stats = store.stats()
    assert stats.blocks == 1 and stats.bytes == HEADER_SIZE + LAYOUT.nbytes
