"""What the store's lookups cost on NFS, in RPCs counted by the client (not in wall time, which a
loopback server hides): these pin the round trips per batch so a change that adds a stat per
block shows up as a failure, not as a slower benchmark on someone else's cluster."""

from __future__ import annotations

import os
import pathlib

from nfs_loopback import LoopbackNfs

from ucm.store import BlockLayout, FileStore, rpc_counters

SALT = bytes(range(16))
LAYOUT = BlockLayout(dtype="uint8", shape=(512,), itemsize=1)
Dirs = tuple[pathlib.Path, pathlib.Path, pathlib.Path]


def _spent(path: pathlib.Path, step: object) -> dict[str, int]:
    before = rpc_counters.rpc_counts(str(path))
    step()  # type: ignore[operator]
    spent = rpc_counters.delta(before, rpc_counters.rpc_counts(str(path)))
    assert spent is not None, f"no RPC counters for {path}: not on the NFS client?"
    return spent


def test_rpc_counts_reads_the_fuse_clients_counters(nfs: LoopbackNfs, nfs_dirs: Dirs) -> None:
    a, _, _ = nfs_dirs
    assert rpc_counters.mount_of(str(a)) == (str(nfs.mountpoints[0]), rpc_counters.FUSE_NFS_TYPE)
    spent = _spent(a, lambda: (a / "x").write_bytes(b"1"))
    assert spent.get("CREATE") == 1 and spent.get("WRITE") == 1 and spent.get("COMMIT") == 1


def test_lookup_round_trips_per_batch(nfs_dirs: Dirs) -> None:
    """Indexed blocks: no RPC at all. A prefix lookup whose first block is absent: one LOOKUP.
    Absent blocks in a plain lookup: one LOOKUP each (NFSv3 has no batched lookup; the index
    is what keeps this off the hot path)."""
    a, b, _ = nfs_dirs
    n = 64
    keys = [os.urandom(20) for _ in range(n)]
    writer = FileStore(a, salt=SALT, io_threads=4, prepare_shards=False)
    writer.index_ready.wait(30)
    try:
        assert all(writer.dump(keys, [bytes(LAYOUT.nbytes)] * n, LAYOUT).wait())
    finally:
        writer.close()
    reader = FileStore(b, salt=SALT, io_threads=4, prepare_shards=False)
    reader.index_ready.wait(30)
    try:
        assert _spent(b, lambda: reader.lookup(keys)) == {}
        assert _spent(b, lambda: reader.lookup_prefix(keys)) == {}
        absent = [os.urandom(20) for _ in range(n)]
        assert _spent(b, lambda: reader.lookup_prefix(absent + keys)) == {"LOOKUP": 1}
        assert _spent(b, lambda: reader.lookup(absent)) == {"LOOKUP": n}
    finally:
        reader.close()
