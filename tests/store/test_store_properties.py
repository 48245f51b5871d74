"""Property-based tests of the file store (Hypothesis): whatever happens, a load returns the
published bytes exactly or is a clean miss, never anything else.

* `StoreMachine`: arbitrary sequences of dump / load / lookup / remove / external eviction
  (`ucm store gc`) / reopen (other direct-I/O and capacity settings) and writers SIGKILLed
  mid-dump, checked against a model of what each key may be.
* `test_damage_to_any_store_file`: arbitrary byte damage to any file of a store (an object or
  the marker): set bytes, truncate, extend.

Real files in a fresh temporary directory per example, real payloads. Hypothesis runs
examples in one test function, so directories come from `tempfile`, not `tmp_path`.
"""

from __future__ import annotations

import enum
import fcntl
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from store_helpers import LAYOUT, SALT, die_now, forked, killed_by_sigkill, payload_for

from ucm.store import BlockLayout, FileStore, StoreError, fileio
from ucm.store.format import (
    HEADER_SIZE,
    MARKER_FORMAT,
    MARKER_NAME,
    MARKER_VERSION,
    OBJECTS_DIR,
    QUARANTINE_DIR,
    decode_header,
    object_path,
)
from ucm.store.maintenance import collect_garbage
from ucm.store.scan import scan_objects

# Above the 256 KiB threshold at which payload hashing runs on a verify thread (and buffered
# writes put the payload down before the header), and not 4,096-aligned.
LARGE = BlockLayout("uint8", (270_001,), 1)
KEYS = [b"property-test-key-" + i.to_bytes(2, "big") for i in range(10)]
LARGE_OBJECT = HEADER_SIZE + fileio.align_up(LARGE.nbytes)  # its size on disk, at most


def layout_of(key: bytes) -> BlockLayout:
    """Each key has one layout, as in the connector (the layout is part of what the key names)."""
    return LARGE if key[-1] % 4 == 3 else LAYOUT


@functools.cache
def expected(key: bytes) -> bytes:
    return payload_for(key, layout_of(key).nbytes).tobytes()


def by_layout(keys: Sequence[bytes]) -> dict[BlockLayout, list[bytes]]:
    groups: dict[BlockLayout, list[bytes]] = {}
    for key in keys:
        groups.setdefault(layout_of(key), []).append(key)
    return groups


def load_all(store: FileStore, keys: Sequence[bytes]) -> dict[bytes, bytes | None]:
    """Each key's loaded bytes, or None for a miss. Buffers start as garbage, not zeros."""
    out: dict[bytes, bytes | None] = {}
    for layout, group in by_layout(keys).items():
        buffers = [np.full(layout.nbytes, 0xA5, np.uint8) for _ in group]
        results = store.load(group, buffers, layout).wait(60)
        for key, buf, ok in zip(group, buffers, results, strict=True):
            out[key] = buf.tobytes() if ok else None
    return out


def dump_all(store: FileStore, keys: Sequence[bytes]) -> list[bool]:
    results = []
    for layout, group in by_layout(keys).items():
        payloads = [np.frombuffer(expected(k), np.uint8) for k in group]
        results += store.dump(group, payloads, layout).wait(60)
    return results


# -- a writer killed at an arbitrary point of its dumps -------------------------------------------

# Every file operation of the dump path (fsync_dir included), so a countdown over them kills
# the writer before any one of them: after creating the temp file, between the payload and
# the header writes of a large block, before or after publishing, before removing the temp.
_DUMP_PATH_OPS = ("open", "pwritev", "fsync", "close", "link", "rename", "unlink")


def _torn_write(
    pwritev: Callable[..., int], fd: int, buffers: Sequence[memoryview], offset: int, *, torn: float
) -> None:
    """Write the first `torn` fraction of the buffers' bytes. Direct I/O writes (and accepts)
    only whole aligned blocks from aligned memory, so there the prefix is whole blocks too."""
    data = b"".join(bytes(b) for b in buffers)
    n = int(len(data) * torn)
    if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
        n -= n % fileio.ALIGN
    if n:
        prefix = fileio.AlignedBuffer(n).view(n)
        prefix[:] = data[:n]
        pwritev(fd, [prefix], offset)


def _arm_kill(countdown: int, torn: float) -> None:
    """In a forked writer only: SIGKILL ourselves just before the `countdown`-th file operation.
    A write chosen for the kill first puts down a `torn` fraction of its bytes, as a crash in
    the middle of a large write does."""
    left = [countdown]

    def due() -> bool:
        left[0] -= 1
        return left[0] <= 0

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kwargs: Any) -> Any:
            if due():
                if name == "pwritev":
                    _torn_write(real, *args, torn=torn)
                die_now()
            return real(*args, **kwargs)

        return op

    for name in _DUMP_PATH_OPS:
        setattr(os, name, wrap(name, getattr(os, name)))
    fileio.rename_noreplace = wrap("renameat2", fileio.rename_noreplace)


def _doomed_writer(
    root: str, keys: list[bytes], countdown: int, torn: float, direct: bool, fsync: bool
) -> None:
    store = FileStore(
        root,
        salt=SALT,
        io_threads=1,
        direct=direct,
        durability="fsync" if fsync else "none",
        prepare_shards=False,
    )
    store.index_ready.wait(10)  # the start-up scan is not what we kill
    for key in keys:
        expected(key)  # made (and cached) before the countdown starts: it counts only dump I/O
    _arm_kill(countdown, torn)
    if not all(dump_all(store, keys)):
        raise RuntimeError("a dump failed")  # exit status 1: the test fails


# -- the model ------------------------------------------------------------------------------------


class Is(enum.Enum):
    ABSENT = "absent"  # no object: load and lookup miss
    PRESENT = "present"  # a published object: load is bit-exact, lookup hits
    MAYBE = "maybe"  # a killed writer's or an evictable one: bit-exact or a miss
    GONE = "gone"  # removed behind this store's back: load misses, lookup may still hint a hit


key_indices = st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=6)
unique_indices = st.lists(st.integers(0, len(KEYS) - 1), min_size=1, max_size=6, unique=True)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="ucm-store-machine-")
        self.capacity: int | None = None
        self.direct = False
        self.store = self._open()
        self.model = {key: Is.ABSENT for key in KEYS}

    def _open(self) -> FileStore:
        store = FileStore(
            self.root,
            salt=SALT,
            io_threads=2,
            direct=self.direct,
            capacity_bytes=self.capacity,
            prepare_shards=False,
        )
        store.index_ready.wait(10)
        return store

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(indices=key_indices)
    def dump(self, indices: list[int]) -> None:
        keys = [KEYS[i] for i in indices]
        assert all(dump_all(self.store, keys))  # capacity always fits one object: never refused
        if self.capacity is not None:  # any dump may have evicted any object, its own batch's too
            self.model = {k: Is.MAYBE if s is Is.PRESENT else s for k, s in self.model.items()}
        for key in keys:
            self.model[key] = Is.PRESENT if self.capacity is None else Is.MAYBE

    @rule(indices=unique_indices)
    def load(self, indices: list[int]) -> None:
        keys = [KEYS[i] for i in indices]
        for key, got in load_all(self.store, keys).items():
            state = self.model[key]
            if state is Is.MAYBE:
                event(f"a maybe-published block {'loaded' if got is not None else 'missed'}")
            if got is not None:
                assert state in (Is.PRESENT, Is.MAYBE), f"{key!r} loaded but is {state}"
                assert got == expected(key), f"{key!r} loaded wrong bytes"
                self.model[key] = Is.PRESENT
            else:
                assert state is not Is.PRESENT, f"{key!r} is published but its load missed"
                self.model[key] = Is.ABSENT  # a miss removed it from the index (and quarantine)

    @rule(indices=unique_indices)
    def lookup(self, indices: list[int]) -> None:
        keys = [KEYS[i] for i in indices]
        for key, hit in zip(keys, self.store.lookup(keys), strict=True):
            state = self.model[key]
            assert hit or state is not Is.PRESENT, f"{key!r} is published but lookup missed"
            assert not hit or state is not Is.ABSENT, f"{key!r} does not exist but lookup hit"
            if not hit:
                self.model[key] = Is.ABSENT  # not in the index and no file: nothing brings it back

    @rule(indices=key_indices)
    def lookup_prefix(self, indices: list[int]) -> None:
        keys = [KEYS[i] for i in indices]
        count = self.store.lookup_prefix(keys)
        assert all(self.model[k] is not Is.ABSENT for k in keys[:count])
        if count < len(keys):
            assert self.model[keys[count]] is not Is.PRESENT

    @rule(indices=unique_indices)
    def remove(self, indices: list[int]) -> None:
        keys = [KEYS[i] for i in indices]
        removed = self.store.remove(keys)
        states = [self.model[k] for k in keys]
        assert states.count(Is.PRESENT) <= removed <= len(keys) - states.count(Is.ABSENT)
        for key in keys:
            self.model[key] = Is.ABSENT

    @rule(objects=st.integers(0, 4))
    def gc_from_another_process(self, objects: int) -> None:
        """`ucm store gc` (or another host) evicts LRU objects behind this store's back."""
        collect_garbage(self.root, objects * (HEADER_SIZE + LAYOUT.nbytes))
        on_disk = {o.key for o in scan_objects(os.path.join(self.root, OBJECTS_DIR))[0]}
        for key, state in self.model.items():
            if key in on_disk:
                self.model[key] = Is.PRESENT  # published objects are always whole, a killed writer's too
            elif state in (Is.PRESENT, Is.MAYBE):
                self.model[key] = Is.GONE

    @rule(direct=st.booleans(), capacity=st.none() | st.integers(2, 6))
    def reopen(self, direct: bool, capacity: int | None) -> None:
        self.store.close()
        self.direct = direct
        self.capacity = None if capacity is None else capacity * LARGE_OBJECT
        self.store = self._open()
        self.model = {k: Is.ABSENT if s is Is.GONE else s for k, s in self.model.items()}

    @rule(
        indices=key_indices,
        countdown=st.integers(1, 30),
        torn=st.floats(0, 1),
        direct=st.booleans(),
        fsync=st.booleans(),
    )
    def writer_killed_mid_dump(
        self, indices: list[int], countdown: int, torn: float, direct: bool, fsync: bool
    ) -> None:
        keys = [KEYS[i] for i in indices]
        pid = forked(functools.partial(_doomed_writer, self.root, keys, countdown, torn, direct, fsync))
        _, status = os.waitpid(pid, 0)
        finished = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert finished or killed_by_sigkill(status), f"writer ended with status {status:#x}"
        event("writer finished its dumps" if finished else "writer killed mid-dump")
        for key in keys:
            if finished:
                self.model[key] = Is.PRESENT
            elif self.model[key] is not Is.PRESENT:
                self.model[key] = Is.MAYBE

    @invariant()
    def nothing_is_ever_damaged(self) -> None:
        """No damage is injected here: a killed writer must never leave a corrupt object."""
        assert self.store.stats().corrupt == 0

    @invariant()
    def every_published_object_is_whole(self) -> None:
        """Checked on the files themselves, not through the store: a published name only ever
        holds a complete object, whoever wrote it and wherever that writer was killed."""
        for entry in scan_objects(os.path.join(self.root, OBJECTS_DIR))[0]:
            with open(entry.path, "rb") as f:
                data = f.read()
            header = decode_header(data)
            payload = expected(entry.key)
            assert header.key == entry.key and header.layout == layout_of(entry.key).describe()
            assert data[HEADER_SIZE : HEADER_SIZE + len(payload)] == payload, f"{entry.path} is torn"


# Each example forks writers and does real I/O for up to 25 steps, so fewer examples than the
# profile's: 50 with "ci" (1.5-3 s), a tenth of the profile's (500) with "long".
_PROFILE = settings.default or settings()
TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=max(50, _PROFILE.max_examples // 10), stateful_step_count=25)


# -- damage ---------------------------------------------------------------------------------------


def _damage(data: st.DataObject, original: bytes) -> bytes:
    """One to three of: set a byte to a value, truncate, extend."""
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3), label="operations")):
        what = data.draw(st.sampled_from(["set", "truncate", "extend"]), label="operation")
        if what == "set" and damaged:
            position = data.draw(st.integers(0, len(damaged) - 1), label="position")
            damaged[position] = data.draw(st.integers(0, 255), label="value")
        elif what == "truncate":
            del damaged[data.draw(st.integers(0, len(damaged)), label="length") :]
        else:
            damaged += data.draw(st.binary(min_size=1, max_size=5000), label="extension")
    return bytes(damaged)


def _marker_is_valid(raw: bytes) -> bool:
    """What the marker's specification accepts: UTF-8 JSON of the right format and version."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError:
        return False
    if not isinstance(meta, dict):
        return False
    return bool(meta.get("format") == MARKER_FORMAT and meta.get("version") == MARKER_VERSION)


def _reopened(store: FileStore, direct: bool) -> FileStore:
    """Waits for the start-up scan so each example is reproducible; a scan racing loads is
    covered on its own (test_store_file.py::test_removal_during_a_scan_is_not_undone)."""
    store.close()
    store = FileStore(store.root, salt=SALT, io_threads=2, direct=direct, prepare_shards=False)
    store.index_ready.wait(10)
    return store


def _check_marker_damage(store: FileStore, raw: bytes, keys: list[bytes], direct: bool) -> None:
    if not _marker_is_valid(raw):
        store.close()
        with pytest.raises(StoreError, match=MARKER_NAME):
            FileStore(store.root, salt=SALT, io_threads=1, direct=direct, prepare_shards=False)
        return
    store = _reopened(store, direct)
    try:
        assert load_all(store, keys) == {k: expected(k) for k in keys}
    finally:
        store.close()


def _check_object_damage(
    store: FileStore, damaged_key: bytes, meaningful_changed: bool, keys: list[bytes]
) -> None:
    """Only the damaged object may miss, and it misses exactly when a byte that matters (header
    or payload, not the trailing bytes after it) changed; then it is counted and quarantined."""
    got = load_all(store, keys)
    others = [k for k in keys if k != damaged_key]
    assert {k: got[k] for k in others} == {k: expected(k) for k in others}
    stats = store.stats()
    if not meaningful_changed:
        assert got[damaged_key] == expected(damaged_key) and stats.corrupt == 0
        return
    assert got[damaged_key] is None, "damaged object loaded"
    assert stats.corrupt == 1 and stats.load_failures == 1 and stats.loads == len(keys) - 1
    assert not os.path.exists(object_path(os.path.join(store.root, OBJECTS_DIR), damaged_key))
    assert len(os.listdir(os.path.join(store.root, QUARANTINE_DIR))) == 1
    assert store.lookup([damaged_key]) == [False]
    assert dump_all(store, [damaged_key]) == [True]  # and the next dump repairs it
    assert load_all(store, [damaged_key]) == {damaged_key: expected(damaged_key)}


@given(data=st.data(), direct=st.booleans(), reader_direct=st.booleans(), reopen=st.booleans())
def test_damage_to_any_store_file(
    data: st.DataObject, direct: bool, reader_direct: bool, reopen: bool
) -> None:
    keys = [KEYS[0], KEYS[1], KEYS[3]]  # two small objects and a large one
    with tempfile.TemporaryDirectory(prefix="ucm-store-damage-") as root:
        store = FileStore(root, salt=SALT, io_threads=2, direct=direct, prepare_shards=False)
        try:
            assert dump_all(store, keys) == [True] * len(keys)
            objects = os.path.join(root, OBJECTS_DIR)
            files = [os.path.join(root, MARKER_NAME)] + [object_path(objects, k) for k in keys]
            target = data.draw(st.sampled_from(files), label="file")
            with open(target, "rb") as f:
                original = f.read()
            damaged = _damage(data, original)
            with open(target, "r+b") as f:  # in place: the same inode, as a disk error leaves it
                f.write(damaged)
                f.truncate(len(damaged))
            if target.endswith(MARKER_NAME):
                _check_marker_damage(store, damaged, keys, reader_direct)
                return
            key = keys[files.index(target) - 1]
            end = HEADER_SIZE + layout_of(key).nbytes
            if reopen:
                store = _reopened(store, reader_direct)
            _check_object_damage(store, key, damaged[:end] != original[:end], keys)
        finally:
            store.close()
