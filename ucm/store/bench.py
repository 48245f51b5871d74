"""`ucm store bench`: store throughput against a same-run raw-disk baseline.

Each round, on the same filesystem, with the same block size, bytes and thread count:

1. raw write: every thread writes its share of the blocks sequentially into one plain file;
2. store dump: the same bytes as fresh keys through `FileStore.dump`;
3. (untimed) every file of both is fsynced and its pages dropped (POSIX_FADV_DONTNEED), so
   both reads come from the device; with `--direct` both sides use O_DIRECT throughout;
4. raw read of the plain files, then store load into preallocated buffers (verified bit-exact
   afterwards, untimed).

With `--fsync` the raw writer fsyncs every block, as the store does with durability=fsync.
Rounds alternate raw and store phases so a noisy neighbour hurts both alike; the median of
the rounds is reported. Then: lookup of 8,192 present keys through a second store object
(index built by its start-up scan), lookup of 8,192 absent keys (stat fallback), and block
hashing throughput. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ucm.hashing import BlockHasher, CacheIdentity, KVGeometry
from ucm.store import fileio, rpc_counters
from ucm.store.base import BlockLayout, StoreError
from ucm.store.file_store import FileStore
from ucm.store.format import object_path

_O_DIRECT = getattr(os, "O_DIRECT", 0)
BENCH_SALT = b"ucm-bench-salt!!"
LOOKUP_BLOCKS = 8192


class Progress:
    """A one-line stderr bar (silent in --json mode)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<24}")
            sys.stderr.flush()
            if self.done == self.total:
                sys.stderr.write("\n")


def _blocks(count: int, size: int) -> list[memoryview]:
    """`count` page-aligned blocks of random bytes, each stamped with its index."""
    pattern = np.frombuffer(os.urandom(size), dtype=np.uint8)
    out = []
    for i in range(count):
        view = fileio.AlignedBuffer(size).view(size)
        np.frombuffer(view, dtype=np.uint8)[:] = pattern
        view[:8] = i.to_bytes(8, "little")
        out.append(view)
    return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _split(n: int, parts: int) -> list[range]:
    step = -(-n // parts)
    return [range(i, min(i + step, n)) for i in range(0, n, step)]


def _raw_write(
    paths: Sequence[str], shares: Sequence[range], src: Sequence[memoryview], direct: bool, fsync: bool
) -> None:
    size = src[0].nbytes

    def write(path: str, share: range) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (_O_DIRECT if direct else 0), 0o644)
        try:
            for n, i in enumerate(share):
                fileio.pwrite_all(fd, [src[i]], n * size)
                if fsync:
                    os.fsync(fd)
        finally:
            os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        list(pool.map(write, paths, shares))


def _raw_read(
    paths: Sequence[str],
    shares: Sequence[range],
    dst: Sequence[memoryview],
    direct: bool,
    readahead: bool = True,
) -> None:
    size = dst[0].nbytes

    def read(path: str, share: range) -> None:
        fd = os.open(path, os.O_RDONLY | (_O_DIRECT if direct else 0))
        if not readahead:  # every I/O exactly one block, as for the store's one-file-per-block reads
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            for n, i in enumerate(share):
                if fileio.pread_full(fd, [dst[i]], n * size) != size:
                    raise OSError(f"short read from {path}")
        finally:
            os.close(fd)

    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        list(pool.map(read, paths, shares))


def _settle(paths: Sequence[str]) -> None:
    """fsync and drop the page cache of each file (untimed), so reads hit the device."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            fileio.drop_cache(fd)
        finally:
            os.close(fd)


def _round(
    work: str,
    number: int,
    src: Sequence[memoryview],
    dst: Sequence[memoryview],
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, float]:
    size, count, threads = src[0].nbytes, len(src), args.threads
    layout = BlockLayout("uint8", (size,), 1)
    total = size * count
    shares = _split(count, threads)
    raw_paths = [os.path.join(work, f"raw-{number}-{t}.dat") for t in range(len(shares))]
    store = FileStore(
        os.path.join(work, "store"),
        salt=BENCH_SALT,
        durability="fsync" if args.fsync else "none",
        direct=args.direct,
        io_threads=threads,
    )
    store.index_ready.wait()  # an opened, ready store: start-up work is not dump throughput
    os.sync()  # the previous round's deletions must not be flushed during this round's first phase
    try:
        keys = [os.urandom(20) for _ in range(count)]
        objects = os.path.join(work, "store", "objects")
        times: dict[str, float] = {}
        results: list[bool] = []

        def raw_write() -> None:
            times["raw_write"] = _timed(lambda: _raw_write(raw_paths, shares, src, args.direct, args.fsync))
            _settle(raw_paths)  # untimed: the next phase must not pay for this one's writeback
            progress.step(f"round {number} raw write")

        def dump() -> None:
            times["dump"] = _timed(lambda: results.extend(store.dump(keys, src, layout).wait()))
            if not all(results):
                raise RuntimeError(f"store dump failed for {results.count(False)} blocks: {store.stats()}")
            _settle([object_path(objects, k) for k in keys])
            progress.step(f"round {number} store dump")

        def raw_read() -> None:
            times["raw_read"] = _timed(lambda: _raw_read(raw_paths, shares, dst, args.direct))
            _settle(raw_paths)
            if not args.direct:  # informational: how much of the gap is readahead across blocks
                times["raw_read_no_readahead"] = _timed(
                    lambda: _raw_read(raw_paths, shares, dst, args.direct, readahead=False)
                )
                _settle(raw_paths)
            progress.step(f"round {number} raw read")

        def load() -> None:
            for view in dst:
                view[:8] = b"\xff" * 8  # make sure the load below really writes every block
            results.clear()
            times["load"] = _timed(lambda: results.extend(store.load(keys, dst, layout).wait()))
            if not all(results) or any(a != b for a, b in zip(src, dst, strict=True)):
                raise RuntimeError("store load returned wrong or missing blocks")
            _settle([object_path(objects, k) for k in keys])
            progress.step(f"round {number} store load")

        # alternate which side goes first, so ordering effects (writeback, caches) cancel out
        phases = [raw_write, dump, raw_read, load] if number % 2 else [dump, raw_write, load, raw_read]
        for phase in phases:
            phase()
        store.remove(keys)
    finally:
        store.close()
        for path in raw_paths:
            if os.path.exists(path):
                os.unlink(path)
    return {f"{name}_gbps": total / seconds / 1e9 for name, seconds in times.items()}


def _rpcs(path: str, step: Callable[[], object]) -> int | None:
    """Run `step`; the NFS RPCs it cost this process's client (None off NFS)."""
    before = rpc_counters.rpc_counts(path)
    step()
    spent = rpc_counters.delta(before, rpc_counters.rpc_counts(path))
    return None if spent is None else sum(spent.values())


def _lookup_bench(work: str) -> dict[str, float]:
    """Lookup latency, and on NFS its RPC count: lookups are where per-block metadata round
    trips hide (a stat of a block the index lacks is one LOOKUP)."""
    path = os.path.join(work, "lookup")
    layout = BlockLayout("uint8", (256,), 1)
    keys = [os.urandom(20) for _ in range(LOOKUP_BLOCKS)]
    early = FileStore(path, salt=BENCH_SALT, io_threads=8, prepare_shards=False)  # scans before the writes
    early.index_ready.wait()
    writer = FileStore(path, salt=BENCH_SALT, io_threads=4, prepare_shards=False)  # the dump makes them
    payload = bytes(256)
    if not all(writer.dump(keys, [payload] * len(keys), layout).wait()):
        raise RuntimeError("could not write the lookup blocks")
    writer.close()
    rpcs: dict[str, int | None] = {}
    # blocks another host wrote after this store's scan: only the filesystem knows them
    unindexed = _timed(lambda: rpcs.update(unindexed=_rpcs(path, lambda: _expect(early.lookup(keys), True))))
    early.close()
    reader: FileStore | None = None

    def open_reader() -> None:
        nonlocal reader
        reader = FileStore(path, salt=BENCH_SALT, io_threads=8, prepare_shards=False)
        reader.index_ready.wait()  # another process's view: index from its start-up scan

    rpcs["scan"] = _rpcs(path, open_reader)
    assert reader is not None
    store = reader
    rpcs["hit"] = _rpcs(path, lambda: _expect(store.lookup(keys), True))
    hit = statistics.median(_timed(lambda: _expect(store.lookup(keys), True)) for _ in range(5))
    cpu = time.process_time()
    for _ in range(5):
        store.lookup(keys)
    hit_cpu = (time.process_time() - cpu) / 5
    rpcs["prefix"] = _rpcs(path, lambda: _expect([store.lookup_prefix(keys) == len(keys)], True))
    prefix = statistics.median(
        _timed(lambda: _expect([store.lookup_prefix(keys) == len(keys)], True)) for _ in range(5)
    )
    absent = [os.urandom(20) for _ in range(LOOKUP_BLOCKS)]
    rpcs["miss"] = _rpcs(path, lambda: _expect(store.lookup(absent), False))
    rpcs["prefix_miss"] = _rpcs(path, lambda: _expect([store.lookup_prefix(absent) == 0], True))
    miss = statistics.median(_timed(lambda: _expect(store.lookup(absent), False)) for _ in range(3))
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    out = {
        "lookup_ms_8192": hit * 1e3,
        "lookup_cpu_ms_8192": hit_cpu * 1e3,
        "lookup_prefix_ms_8192": prefix * 1e3,
        "lookup_miss_ms_8192": miss * 1e3,
        "lookup_unindexed_ms_8192": unindexed * 1e3,
    }
    out.update({f"rpcs_{name}_8192": float(n) for name, n in rpcs.items() if n is not None})
    return out


def _expect(results: list[bool], value: bool) -> None:
    if any(r != value for r in results):
        raise RuntimeError(f"lookup returned {results.count(not value)} unexpected results")


def hash_throughput(tokens: int = 1 << 20, block_size: int = 16) -> tuple[float, float]:
    """Million tokens per second through BlockHasher on a Python list (what vLLM hands us):
    best wall-clock rate of 5 runs, and the rate per CPU second (immune to a busy machine)."""
    identity = CacheIdentity("bench/model", "main", "bfloat16", KVGeometry(32, 8, 128), block_size)
    hasher = BlockHasher(identity)
    token_ids = np.random.default_rng(0).integers(0, 150_000, tokens).tolist()
    walls, cpus = [], []
    for _ in range(5):
        cpu = time.process_time()
        walls.append(_timed(lambda: hasher.hash_blocks(token_ids)))
        cpus.append(time.process_time() - cpu)
    return tokens / min(walls) / 1e6, tokens / max(min(cpus), 1e-9) / 1e6


def filesystem_of(path: str) -> str:
    """'type device' of the mount holding `path` (from /proc/self/mounts), or 'unknown'."""
    best, found = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, found = mount, f"{fstype} {device}"
    except OSError:
        pass
    return found


def run_bench(args: argparse.Namespace) -> dict[str, object]:
    base = os.path.abspath(args.path)
    if os.path.exists(base) and not os.path.isdir(base):
        raise StoreError(f"--path {base}: not a directory")
    size = int(args.block_mib * (1 << 20))
    if size <= 0 or size % fileio.ALIGN:
        raise StoreError(f"--block-mib {args.block_mib}: the block must be a positive multiple of 4 KiB")
    if args.blocks < args.threads or args.threads < 1 or args.rounds < 1:
        raise StoreError("--blocks must be >= --threads >= 1 and --rounds >= 1")
    work = os.path.join(base, f"ucm-bench-{os.getpid()}")
    os.makedirs(work)
    progress = Progress(4 * args.rounds + 2, enabled=not args.json)
    try:
        src, dst = _blocks(args.blocks, size), _blocks(args.blocks, size)
        rounds = [_round(work, r + 1, src, dst, args, progress) for r in range(args.rounds)]
        lookup = _lookup_bench(work)
        progress.step("lookup 8192")
        hash_wall, hash_cpu = hash_throughput()
        progress.step("hashing")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, object] = {
        name: round(statistics.median(r[name] for r in rounds), 3)
        for name in ("raw_write_gbps", "raw_read_gbps", "dump_gbps", "load_gbps")
    }
    if "raw_read_no_readahead_gbps" in rounds[0]:
        result["raw_read_no_readahead_gbps"] = round(
            statistics.median(r["raw_read_no_readahead_gbps"] for r in rounds), 3
        )
    result["dump_vs_raw"] = round(float(result["dump_gbps"]) / float(result["raw_write_gbps"]), 3)  # type: ignore[arg-type]
    result["load_vs_raw"] = round(float(result["load_gbps"]) / float(result["raw_read_gbps"]), 3)  # type: ignore[arg-type]
    result.update({k: round(v, 3) for k, v in lookup.items()})
    result["hash_mtok_s"] = round(hash_wall, 1)
    result["hash_mtok_s_cpu"] = round(hash_cpu, 1)
    result.update(
        units="GB = 1e9 bytes; rates are medians over rounds",
        path=base,
        filesystem=filesystem_of(base),
        block_bytes=size,
        blocks=args.blocks,
        threads=args.threads,
        rounds=args.rounds,
        direct=args.direct,
        fsync=args.fsync,
        per_round=rounds,
    )
    return result


_RPC_LABELS = {
    "scan": "start-up scan of 8192 blocks (index warm-up)",
    "hit": "lookup of 8192 indexed blocks",
    "prefix": "lookup_prefix of 8192 indexed blocks",
    "miss": "lookup of 8192 absent blocks",
    "prefix_miss": "lookup_prefix of 8192 blocks, first absent",
    "unindexed": "lookup of 8192 blocks written after the scan",
}


def _rpc_lines(result: dict[str, object]) -> list[str]:
    lines = [f"  NFS RPCs, {label}: {int(result[f'rpcs_{name}_8192'])}"  # type: ignore[call-overload]
             for name, label in _RPC_LABELS.items() if f"rpcs_{name}_8192" in result]
    return ["NFS client RPC counters (per call):", *lines] if lines else []


def format_table(result: dict[str, object]) -> str:
    mode = ("O_DIRECT" if result["direct"] else "buffered, page cache dropped before reads") + (
        ", fsync per block" if result["fsync"] else ""
    )
    lines = [
        f"ucm store bench at {result['path']} ({result['filesystem']}; {mode})",
        f"{result['blocks']} blocks x {int(result['block_bytes']) / (1 << 20):g} MiB, {result['threads']} threads, "  # type: ignore[call-overload]
        f"median of {result['rounds']} rounds; GB = 1e9 bytes",
        "",
        f"{'':<14}{'raw GB/s':>10}{'store GB/s':>12}{'store/raw':>11}",
        f"{'write/dump':<14}{result['raw_write_gbps']:>10.2f}{result['dump_gbps']:>12.2f}{result['dump_vs_raw']:>11.2f}",
        f"{'read/load':<14}{result['raw_read_gbps']:>10.2f}{result['load_gbps']:>12.2f}{result['load_vs_raw']:>11.2f}",
        *(
            [
                f"raw read with readahead off (block-sized I/Os, as the store's per-block files): "
                f"{result['raw_read_no_readahead_gbps']:.2f} GB/s; load is "
                f"{float(result['load_gbps']) / float(result['raw_read_no_readahead_gbps']):.2f}x that"  # type: ignore[arg-type]
            ]
            if "raw_read_no_readahead_gbps" in result
            else []
        ),
        "",
        f"lookup of 8192 present blocks   {result['lookup_ms_8192']:8.2f} ms  (goal <= 5 ms; "
        f"{result['lookup_cpu_ms_8192']:.2f} ms CPU)",
        f"lookup_prefix of 8192 blocks    {result['lookup_prefix_ms_8192']:8.2f} ms",
        f"lookup of 8192 absent blocks    {result['lookup_miss_ms_8192']:8.2f} ms  (one stat each)",
        f"lookup of 8192 blocks written after this store's scan {result['lookup_unindexed_ms_8192']:8.2f} ms",
        *_rpc_lines(result),
        f"block hashing (16-token blocks) {result['hash_mtok_s']:8.1f} M tokens/s  (goal >= 25; "
        f"{result['hash_mtok_s_cpu']:.1f} per CPU-second)",
    ]
    return "\n".join(lines)
