"""The store's cross-host promises, checked on a real NFS path: Ganesha serving one directory,
two independent client mounts of it standing in for two hosts (see conftest.py).

What NFS changes compared with a local disk, and so what is tested here: publication without
RENAME_NOREPLACE (link + unlink), attribute and lookup caches on each client, close-to-open
consistency, and a server that can disappear under a load.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from nfs_loopback import LoopbackNfs

from ucm.store import BlockLayout, FileStore

SALT = bytes(range(16))
LAYOUT = BlockLayout(dtype="uint8", shape=(64 * 1024 + 100,), itemsize=1)  # not page-aligned on purpose
Dirs = tuple[pathlib.Path, pathlib.Path, pathlib.Path]


def keys(n: int) -> list[bytes]:
    return [os.urandom(20) for _ in range(n)]


def payload(key: bytes) -> np.ndarray:
    """A pure function of the key, so every reader can tell right bytes from wrong ones."""
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, LAYOUT.nbytes, dtype=np.uint8)


@pytest.fixture
def open_store() -> Callable[..., FileStore]:
    opened: list[FileStore] = []

    def make(path: pathlib.Path, **options: object) -> FileStore:
        store = FileStore(path, salt=SALT, io_threads=4, prepare_shards=False, **options)  # type: ignore[arg-type]
        assert store.index_ready.wait(30)
        opened.append(store)
        return store

    yield make  # type: ignore[misc]
    for store in opened:
        store.close()


def load_checked(store: FileStore, ks: list[bytes]) -> list[bool]:
    """Load `ks`; every block reported loaded must hold exactly its key's bytes."""
    out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in ks]
    ok = store.load(ks, out, LAYOUT).wait()
    for key, hit, buf in zip(ks, ok, out, strict=True):
        if hit:
            assert np.array_equal(buf, payload(key)), f"wrong bytes loaded for {key.hex()}"
    return ok


def test_the_store_runs_on_a_real_nfs_client(nfs: LoopbackNfs, nfs_dirs: Dirs, open_store: Callable[..., FileStore]) -> None:
    """Guards against testing a local directory by mistake: the store's I/O must show up as
    NFS RPCs of the client, and the objects must land in the server's export."""
    a, _, on_server = nfs_dirs
    before = nfs.rpc_counts(0)
    store = open_store(a)
    ks = keys(4)
    assert all(store.dump(ks, [payload(k) for k in ks], LAYOUT).wait())
    assert all(load_checked(store, ks))
    after = nfs.rpc_counts(0)
    for proc in ("CREATE", "WRITE", "COMMIT", "LINK", "READ"):
        assert after.get(proc, 0) > before.get(proc, 0), f"no {proc} RPC for the store's I/O: {after}"
    assert len(list((on_server / "objects").rglob("*.kv"))) == 4


def test_two_mounts_writing_the_same_blocks_publish_each_once(nfs_dirs: Dirs, open_store: Callable[..., FileStore]) -> None:
    """First writer wins without RENAME_NOREPLACE: exactly one publish per key across both
    hosts, the loser's dump is a no-op, no temp file is left, and every block loads intact."""
    a, b, on_server = nfs_dirs
    ks = keys(40)
    stores = [open_store(a), open_store(b)]
    results: list[list[bool]] = []

    def write(store: FileStore) -> None:
        results.append(store.dump(ks, [payload(k) for k in ks], LAYOUT).wait())

    threads = [threading.Thread(target=write, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(all(r) for r in results)
    assert sum(s.stats().dumps for s in stores) == len(ks)  # the rest were skipped as already published
    assert not [p for p in (on_server / "objects").rglob("*") if p.name.endswith(".tmp")]
    for store in stores:
        assert all(load_checked(store, ks))


def test_readers_never_see_a_partial_block_while_another_mount_writes(
    nfs_dirs: Dirs, open_store: Callable[..., FileStore]
) -> None:
    """Atomic publish across hosts: a reader polling through mount 1 while mount 0 writes gets
    misses or whole, verified blocks, never a torn one."""
    a, b, _ = nfs_dirs
    writer, reader = open_store(a), open_store(b)
    ks = keys(60)
    done, polling = threading.Event(), threading.Event()
    passes: list[int] = []

    def poll() -> None:
        while not done.is_set():
            passes.append(sum(load_checked(reader, ks)))
            polling.set()

    poller = threading.Thread(target=poll)
    poller.start()
    assert polling.wait(30)  # the reader is running before the first write
    for i in range(0, len(ks), 5):
        assert all(writer.dump(ks[i : i + 5], [payload(k) for k in ks[i : i + 5]], LAYOUT).wait())
    done.set()
    poller.join()
    assert reader.stats().corrupt == 0
    assert all(load_checked(reader, ks))
    assert len(passes) >= 2, passes  # at least one pass overlapped or followed the writes


def test_a_block_written_on_one_mount_is_a_hit_on_another(nfs_dirs: Dirs, open_store: Callable[..., FileStore]) -> None:
    """The reader's index was built before the write, so only the NFS lookup can find it: a
    lookup must never miss a block that exists, on another host included."""
    a, b, _ = nfs_dirs
    reader = open_store(b)
    ks = keys(8)
    assert reader.lookup(ks) == [False] * 8  # probes the names first: no stale negative cache may hide them later
    writer = open_store(a)
    assert all(writer.dump(ks, [payload(k) for k in ks], LAYOUT).wait())
    assert reader.lookup(ks) == [True] * 8
    assert reader.lookup_prefix(ks) == 8
    assert all(load_checked(reader, ks))


def test_close_to_open_a_reopen_sees_what_another_mount_closed(nfs_dirs: Dirs) -> None:
    """The rule the store's loads rely on: after mount 0 closes a file, an open on mount 1 sees
    the new bytes, even though mount 1 read (and cached) the old ones a moment before."""
    a, b, _ = nfs_dirs
    old, new = os.urandom(300_000), os.urandom(300_000)
    (a / "f").write_bytes(old)
    assert (b / "f").read_bytes() == old
    with open(a / "f", "r+b") as f:
        f.write(new)
    assert (b / "f").read_bytes() == new
    (a / "f").unlink()
    (a / "f").write_bytes(old[:1000])  # a new file under the same name
    assert (b / "f").read_bytes() == old[:1000]


def test_a_block_damaged_on_the_server_is_a_miss_not_wrong_bytes(
    nfs_dirs: Dirs, open_store: Callable[..., FileStore]
) -> None:
    a, b, on_server = nfs_dirs
    ks = keys(3)
    assert all(open_store(a).dump(ks, [payload(k) for k in ks], LAYOUT).wait())
    victim = next((on_server / "objects").rglob(ks[1].hex() + ".kv"))
    with open(victim, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff" * 16)
    reader = open_store(b)
    assert load_checked(reader, ks) == [True, False, True]
    assert reader.stats().corrupt == 1


def test_a_server_restart_mid_load_is_a_clean_miss_then_loads_resume(
    nfs: LoopbackNfs, nfs_dirs: Dirs, open_store: Callable[..., FileStore]
) -> None:
    """Kill the server (SIGKILL, a crash) while a reader loads in a loop: loads in the outage
    fail as misses (the caller recomputes) within the client's retry time, nothing raises, no
    wrong byte is ever returned, and after the restart the same blocks load again."""
    a, b, _ = nfs_dirs
    ks = keys(8)  # each load in the outage takes the client's retry time (conftest.RETRY_S) to fail
    assert all(open_store(a).dump(ks, [payload(k) for k in ks], LAYOUT).wait())
    reader = open_store(b)
    outcomes: list[list[bool]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.is_set():
                outcomes.append(load_checked(reader, ks))
        except BaseException as exc:
            errors.append(exc)

    loader = threading.Thread(target=loop)
    loader.start()
    try:
        while not outcomes:
            time.sleep(0.01)
        nfs.stop_server()
        outage_started = time.monotonic()
        while not any(not any(o) for o in outcomes) and time.monotonic() - outage_started < 60:
            time.sleep(0.05)
        nfs.start_server()
        restarted = len(outcomes)
        deadline = time.monotonic() + 30
        while not any(all(o) for o in outcomes[restarted + 1 :]) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loader.join(60)
    assert not errors, f"a load raised during the outage: {errors[0]!r}"
    assert any(not any(o) for o in outcomes), f"no load failed while the server was down: {[sum(o) for o in outcomes]}"
    assert all(outcomes[-1]), "loads did not recover after the server restarted"
    assert reader.stats().corrupt == 0  # an outage is not damage: nothing was quarantined
    assert all(load_checked(reader, ks))
