"""A file store: one file per object in a directory on local disk, NFS or a PVC.

Correctness without locks, across processes and hosts:

* Publication: a writer writes header + payload to a uniquely named temp file next to the
  target, optionally fsyncs it, then moves it to the final name with
  renameat2(RENAME_NOREPLACE), or `link` + `unlink` where that is missing (NFS): the first
  complete writer wins and EEXIST means another writer already published the same
  content-addressed bytes, so the dump is a no-op. Filesystems with neither fall back to
  `rename` (last writer wins, same bytes). A writer killed at any moment leaves at most a `.tmp` file,
  which no reader ever opens and `gc` removes by age.
* Reading: buffered loads first ask for the whole file (POSIX_FADV_WILLNEED: one file per block
  gets no readahead from its neighbours, so without it a block is read one readahead window at a
  time), then header and payload come in with one `preadv` straight into the caller's buffer;
  the object is accepted only if magic, version, salt, key, layout, length, header checksum
  (over every header byte) and payload checksum all match. A damaged or foreign object is
  counted, logged with its path and moved to `quarantine/` (only if the name still points at
  the inode we read), and reported as a miss. A host crash with `durability="none"` can leave
  a published file whose data never reached the disk; the payload checksum turns that into a
  miss too.
* Faults: ENOSPC, EDQUOT, EACCES, EPERM or EROFS while writing log one error naming the path
  and switch the store to refusing dumps (`stats().read_only_reason`); loads keep working.
  Nothing in `load`/`dump` raises for an I/O failure.
* Index: an in-memory dict key -> file size, filled by a background scan at start-up (and
  every `rescan_interval_s`) and by this process's dumps and loads, makes `lookup` of present
  keys a dict probe. An object another host evicted stays a (hinted) hit until the next scan
  or until a load finds it gone; a dump confirms an index hit with one stat before skipping. A key not in
  the index is checked with `os.stat` (another host may have written it since), so lookups
  never miss a block that exists. The index also tracks usage for the capacity limit.
* Capacity: before a dump would push usage (including writes in flight) over
  `capacity_bytes`, the writer rescans and evicts least-recently-used objects down to 90% of
  it (see `ucm.store.maintenance` for why mtime and a sorted scan). With several processes on
  one directory each one sees the others' objects at its scans, so the bound holds per scan.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from ucm.store import fileio
from ucm.store.base import BlockLayout, Key, Store, StoreError, StoreStats, Task, WritableBuffer
from ucm.store.checks import check_batch, check_keys
from ucm.store.format import (
    HEADER_SIZE,
    OBJECTS_DIR,
    QUARANTINE_DIR,
    SALT_BYTES,
    Header,
    HeaderError,
    decode_header,
    object_path,
    payload_checksum,
    shard_dir,
    temp_name,
)
from ucm.store.maintenance import evict_lru, remove_stale_temps
from ucm.store.options import DURABILITIES
from ucm.store.root import create_shards, prepare_root
from ucm.store.scan import ObjectEntry, scan_objects
from ucm.store.tasks import DoneTask, FutureTask

log = logging.getLogger("ucm.store")

# Errors after which retrying a write is pointless: the store stops accepting dumps.
_READ_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
_LOW_WATERMARK = 0.9
_STALE_TEMP_S = 3600.0  # no write takes an hour: an older temp file belongs to a dead writer
# Blocks at least this large hash on a separate thread, overlapping the checksum with I/O.
_PIPELINE_BYTES = 256 * 1024
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class _Damaged(Exception):
    """An object that must never be returned; the message says why."""


class FileStore(Store):
    """See the module docstring. `salt` is the 16-byte cache-identity digest every object must carry."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        salt: bytes,
        capacity_bytes: int | None = None,
        durability: str = "none",
        direct: bool = False,
        io_threads: int = 8,
        touch_interval_s: float = 10.0,
        rescan_interval_s: float = 60.0,
        prepare_shards: bool = True,
    ) -> None:
        if not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
            raise StoreError(f"salt must be {SALT_BYTES} bytes (a CacheIdentity.digest()), got {salt!r}")
        if durability not in DURABILITIES:
            raise StoreError(f"durability must be one of {', '.join(DURABILITIES)}, got {durability!r}")
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise StoreError(f"capacity_bytes must be positive or None, got {capacity_bytes}")
        if io_threads < 1:
            raise StoreError(f"io_threads must be >= 1, got {io_threads}")
        if direct and not _O_DIRECT:
            raise StoreError("direct=True needs O_DIRECT, which this platform lacks")
        self.root = os.path.abspath(os.fspath(path))
        self.salt = salt
        self.capacity_bytes = capacity_bytes
        self.fsync = durability == "fsync"
        self.direct = direct
        self.touch_interval_ns = int(touch_interval_s * 1e9)
        self.rescan_interval_s = rescan_interval_s
        self.prepare_shards = prepare_shards
        self._last_scan = time.monotonic()
        self._refresher: threading.Thread | None = None
        self._objects = os.path.join(self.root, OBJECTS_DIR)
        self._quarantine = os.path.join(self.root, QUARANTINE_DIR)
        self._lock = threading.Lock()  # index and counters
        self._scan_lock = threading.Lock()  # one scan/eviction at a time
        self._index: dict[bytes, int] = {}
        self._bytes = 0
        self._in_flight = 0  # bytes reserved by dumps not yet published
        self._scanning = False
        self._changed_during_scan: list[bytes] = []  # keys indexed or unindexed while a scan runs
        self._stats = StoreStats(capacity_bytes=capacity_bytes)
        self._publisher = fileio.Publisher()
        self._logged_errors: set[int] = set()
        self._buffers = fileio.ThreadBuffers()
        self._open_root()
        self._io_threads = io_threads
        self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="ucm-store-io")
        self._verify_pool = concurrent.futures.ThreadPoolExecutor(
            io_threads, thread_name_prefix="ucm-store-verify"
        )
        self.index_ready = threading.Event()
        self._refresher = threading.Thread(target=self._warm_index, name="ucm-store-scan", daemon=True)
        self._refresher.start()
        log.info(
            "UCM file store at %s (salt %s, capacity %s, durability %s, direct I/O %s%s)",
            self.root,
            salt.hex(),
            "unlimited" if capacity_bytes is None else f"{capacity_bytes} bytes",
            durability,
            "on" if direct else "off",
            f"; READ-ONLY: {self._stats.read_only_reason}" if self._stats.read_only_reason else "",
        )

    # -- set-up -----------------------------------------------------------------------------

    def _open_root(self) -> None:
        failure = prepare_root(self.root, direct=self.direct)
        if failure is not None:
            self._refuse_dumps(*failure)

    # -- index --------------------------------------------------------------------------------

    def _warm_index(self) -> None:
        try:
            self.refresh()
            if self.prepare_shards and not self.index_ready.is_set() and self._stats.read_only_reason is None:
                create_shards(self._objects)
        except Exception:  # never let a scan failure take the process down
            log.exception("UCM store: index scan of %s failed; lookups fall back to stat", self.root)
        finally:
            self.index_ready.set()

    def refresh(self) -> list[tuple[bytes, str, int, int]]:
        """Rescan the directory; the index and usage then reflect every host's objects.
        Returns (key, path, size, mtime_ns) of every object seen."""
        with self._scan_lock:
            return self._rescan_locked()

    def _rescan_locked(self) -> list[tuple[bytes, str, int, int]]:
        """Replace the index with a directory listing. A listing is a snapshot that this
        process's own dumps, loads, quarantines and removals can overtake while it runs: for
        every key they changed meanwhile, the live index knows better than the snapshot (a key
        quarantined during the scan must not come back as a hit)."""
        with self._lock:
            self._scanning = True
            self._changed_during_scan = []
        try:
            objects, temps = scan_objects(self._objects)
            if self._stats.read_only_reason is None:
                remove_stale_temps(temps, _STALE_TEMP_S)  # left by writers killed an hour ago or more
        except BaseException:
            with self._lock:
                self._scanning = False
            raise
        with self._lock:
            index = {o.key: o.size for o in objects}
            for key in self._changed_during_scan:
                if key in self._index:
                    index[key] = self._index[key]
                else:
                    index.pop(key, None)
            self._scanning = False
            self._changed_during_scan = []
            self._index = index
            self._bytes = sum(index.values())
            self._last_scan = time.monotonic()
        return [(o.key, o.path, o.size, o.mtime_ns) for o in objects]

    def _indexed(self, key: bytes, size: int, reserved: int = 0) -> None:
        """Record a present object; `reserved` moves a dump's bytes from in-flight to stored
        in the same step, so usage is never under-counted in between."""
        with self._lock:
            self._in_flight -= reserved
            if key not in self._index:
                self._bytes += size
            self._index[key] = size
            if self._scanning:
                self._changed_during_scan.append(key)

    def _unindexed(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size
            if self._scanning:
                self._changed_during_scan.append(key)

    # -- lookup -----------------------------------------------------------------------------------

    def _stat_present(self, key: bytes) -> bool:
        try:
            st = os.stat(object_path(self._objects, key))
        except OSError:
            return False
        self._indexed(key, st.st_size)
        return True

    def _stat_many(self, keys: list[bytes]) -> list[bool]:
        return [self._stat_present(key) for key in keys]

    def _in_chunks(self, per_key: Callable[[list[bytes]], list[bool]], keys: list[bytes]) -> list[bool]:
        """`per_key(keys)`, in a few chunks on the I/O threads when there are many keys: each
        stat or metadata write is an RPC on NFS."""
        if len(keys) <= 256:
            return per_key(keys)
        chunk = -(-len(keys) // self._io_threads)
        return [hit for part in self._pool.map(per_key, [keys[i : i + chunk] for i in range(0, len(keys), chunk)])
                for hit in part]

    def _maybe_refresh(self) -> None:
        """Rescan in the background every `rescan_interval_s`, so objects evicted by other
        hosts leave the index (and usage) instead of lingering as hits until a load fails."""
        if time.monotonic() - self._last_scan < self.rescan_interval_s:
            return
        with self._lock:
            if self._refresher is not None and self._refresher.is_alive():
                return
            self._last_scan = time.monotonic()  # at most one attempt per interval
            self._refresher = threading.Thread(target=self._warm_index, name="ucm-store-scan", daemon=True)
            self._refresher.start()

    def lookup(self, keys: Sequence[Key]) -> list[bool]:
        check_keys(keys)
        self._maybe_refresh()
        found = list(map(self._index.__contains__, keys))
        missing = [i for i, hit in enumerate(found) if not hit]
        for i, hit in zip(missing, self._in_chunks(self._stat_many, [keys[i] for i in missing]), strict=True):
            found[i] = hit
        hits = sum(found)
        with self._lock:
            self._stats.lookups += len(keys)
            self._stats.hits += hits
            self._stats.misses += len(keys) - hits
        return found

    def lookup_prefix(self, keys: Sequence[Key]) -> int:
        """Stats only the keys the index lacks, and stops at the first real miss, so a new
        prompt costs one stat, not one per block."""
        check_keys(keys)
        self._maybe_refresh()
        in_index = list(map(self._index.__contains__, keys))
        count = 0
        while count < len(keys):
            try:
                gap = in_index.index(False, count)
            except ValueError:
                count = len(keys)
                break
            count = gap
            if not self._stat_present(keys[gap]):
                break
            count += 1
        with self._lock:
            self._stats.lookups += min(count + 1, len(keys))
            self._stats.hits += count
            self._stats.misses += 1 if count < len(keys) else 0
        return count

    # -- load -------------------------------------------------------------------------------------

    def load(self, keys: Sequence[Key], buffers: Sequence[WritableBuffer], layout: BlockLayout) -> Task:
        views = check_batch(keys, buffers, layout, writable=True)
        description = layout.describe()
        return FutureTask(
            [self._pool.submit(self._load_one, k, v, description) for k, v in zip(keys, views, strict=True)]
        )

    def _load_one(self, key: bytes, buf: memoryview, description: str) -> bool | Future[bool]:
        """Read on an I/O thread; verify the payload checksum on a verify thread for large
        blocks, so this I/O thread moves on to the next read and the device stays busy."""
        path = object_path(self._objects, key)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | (_O_DIRECT if self.direct else 0))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self._log_once(exc, path, "read")
            self._unindexed(key)
            return self._count_load(False, 0)
        try:
            inode = os.fstat(fd).st_ino
            if not self.direct:
                fileio.prefetch(fd)
            checksum = self._read_object(fd, key, buf, description)
            self._touch(fd)
        except _Damaged as exc:
            self._quarantine_object(inode, key, path, str(exc))
            return self._count_load(False, 0)
        except _LayoutMismatch as exc:
            log.debug("UCM store: %s: %s", path, exc)
            return self._count_load(False, 0)
        except OSError as exc:
            self._log_once(exc, path, "read")
            return self._count_load(False, 0)
        finally:
            os.close(fd)
        if buf.nbytes >= _PIPELINE_BYTES:
            return self._verify_pool.submit(self._verify, key, path, inode, buf, checksum)
        return self._verify(key, path, inode, buf, checksum)

    def _verify(self, key: bytes, path: str, inode: int, buf: memoryview, checksum: int) -> bool:
        if payload_checksum(buf) != checksum:
            self._quarantine_object(inode, key, path, "payload checksum mismatch")
            return self._count_load(False, 0)
        return self._count_load(True, buf.nbytes)

    def _read_object(self, fd: int, key: bytes, buf: memoryview, description: str) -> int:
        """Read and check the header, read the payload into `buf`; the payload checksum the
        header promises (the caller verifies it: the bytes in `buf` are not valid until then)."""
        n = buf.nbytes
        bounce: memoryview | None = None
        if self.direct and not fileio.is_aligned(buf):
            bounce = self._buffers.get(HEADER_SIZE + fileio.align_up(n))
            got = fileio.pread_full(fd, [bounce], 0)
            header_view, payload = bounce[:HEADER_SIZE], bounce[HEADER_SIZE : HEADER_SIZE + n]
        else:
            header_view = self._buffers.get(HEADER_SIZE)
            got = fileio.pread_full(fd, [header_view, buf], 0)
            payload = buf
        if got < HEADER_SIZE:
            raise _Damaged(f"truncated: {got} bytes, shorter than the {HEADER_SIZE}-byte header")
        try:
            header = decode_header(header_view)
        except HeaderError as exc:
            raise _Damaged(str(exc)) from exc
        if header.salt != self.salt:
            raise _Damaged(f"written with salt {header.salt.hex()}, this store uses {self.salt.hex()}")
        if header.key != key:
            raise _Damaged(f"holds key {header.key.hex()}, not the key its name says")
        if header.layout != description:
            raise _LayoutMismatch(f"layout {header.layout}, expected {description}")
        if header.payload_len != n:
            raise _Damaged(f"payload length {header.payload_len} does not match layout {description} ({n})")
        if got < HEADER_SIZE + n:
            raise _Damaged(f"truncated: {got - HEADER_SIZE} of {n} payload bytes")
        if bounce is not None:
            fileio.copy_bytes(buf, payload)
        return header.payload_checksum

    def _touch(self, fd: int) -> None:
        """Bump mtime (the LRU clock) at most once per touch interval: a metadata write per
        load would cost an RPC per block on NFS."""
        if self._stats.read_only_reason is not None:
            return
        st = os.fstat(fd)
        now = time.time_ns()
        if now - st.st_mtime_ns >= self.touch_interval_ns:
            try:
                os.utime(fd, ns=(st.st_atime_ns, now))
            except OSError:
                pass  # recency is best effort; never fail a load over it

    def _quarantine_object(self, inode: int, key: bytes, path: str, reason: str) -> None:
        log.warning("UCM store: damaged object %s (%s); quarantined, treated as a miss", path, reason)
        self._unindexed(key)
        with self._lock:
            self._stats.corrupt += 1
        try:
            if os.stat(path).st_ino != inode:
                return  # replaced since we read it: not ours to move
            os.rename(path, os.path.join(self._quarantine, temp_name(key.hex()).lstrip(".")))
        except OSError:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _count_load(self, ok: bool, nbytes: int) -> bool:
        with self._lock:
            if ok:
                self._stats.loads += 1
                self._stats.loaded_bytes += nbytes
            else:
                self._stats.load_failures += 1
        return ok

    # -- dump -------------------------------------------------------------------------------------

    def dump(self, keys: Sequence[Key], buffers: Sequence[WritableBuffer], layout: BlockLayout) -> Task:
        views = check_batch(keys, buffers, layout, writable=False)
        if self._stats.read_only_reason is not None:
            with self._lock:
                self._stats.dump_failures += len(keys)
            return DoneTask([False] * len(keys))
        description = layout.describe()
        return FutureTask(
            [self._pool.submit(self._dump_one, k, v, description) for k, v in zip(keys, views, strict=True)]
        )

    def _dump_one(self, key: bytes, buf: memoryview, description: str) -> bool:
        if self._stats.read_only_reason is not None:
            return self._count_dump(False, skipped=False, nbytes=0)
        if key in self._index:
            # confirm with one stat (cheap next to writing a block): another host may have
            # evicted it, and a skipped dump would then leave the block missing for everyone
            if os.path.exists(object_path(self._objects, key)):
                return self._count_dump(True, skipped=True, nbytes=0)
            self._unindexed(key)
        n = buf.nbytes
        size = HEADER_SIZE + (fileio.align_up(n) if self.direct else n)
        leaf = shard_dir(self._objects, key.hex())
        tmp = os.path.join(leaf, temp_name(key.hex()))
        final = object_path(self._objects, key)
        if not self._reserve(size):
            return self._count_dump(False, skipped=False, nbytes=0)
        where = tmp
        try:
            fd = self._create(tmp, leaf)
            try:
                self._write_object(fd, key, description, buf)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            where = final
            published = self._publisher.publish(tmp, final)
            if self.fsync:
                fileio.fsync_dir(leaf)
        except OSError as exc:
            fileio.unlink_quietly(tmp)
            with self._lock:
                self._in_flight -= size
            self._write_failed(exc, where)
            return self._count_dump(False, skipped=False, nbytes=0)
        except BaseException:
            with self._lock:
                self._in_flight -= size
            raise
        self._indexed(key, size, reserved=size)
        return self._count_dump(True, skipped=not published, nbytes=n if published else 0)

    def _create(self, tmp: str, leaf: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | (_O_DIRECT if self.direct else 0)
        try:
            return os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(leaf, exist_ok=True)  # shards are pre-created; this covers a young store
            return os.open(tmp, flags, 0o644)

    def _write_object(self, fd: int, key: bytes, description: str, buf: memoryview) -> None:
        """Header + payload at offset 0.

        Buffered, large blocks: the payload goes to the page cache while a verify thread
        computes its checksum, then the header (hashing overlaps the copy). O_DIRECT: checksum
        first, then one device write of header + payload; measured faster than a separate
        small synchronous header write."""
        n = buf.nbytes
        if not self.direct:
            if n >= _PIPELINE_BYTES:
                pending = self._verify_pool.submit(payload_checksum, buf)
                fileio.pwrite_all(fd, [buf], HEADER_SIZE)
                header = Header(self.salt, key, description, n, pending.result()).encode()
                fileio.pwrite_all(fd, [memoryview(header)], 0)
            else:
                header = Header(self.salt, key, description, n, payload_checksum(buf)).encode()
                fileio.pwrite_all(fd, [memoryview(header), buf], 0)
            return
        header = Header(self.salt, key, description, n, payload_checksum(buf)).encode()
        if fileio.is_aligned(buf):
            header_view = self._buffers.get(HEADER_SIZE)
            header_view[:] = header
            fileio.pwrite_all(fd, [header_view, buf], 0)
            return
        padded = fileio.align_up(n)
        bounce = self._buffers.get(HEADER_SIZE + padded)
        bounce[:HEADER_SIZE] = header
        fileio.copy_bytes(bounce[HEADER_SIZE : HEADER_SIZE + n], buf)
        bounce[HEADER_SIZE + n :] = bytes(padded - n)  # never leak an older block's bytes
        fileio.pwrite_all(fd, [bounce], 0)

    def _reserve(self, size: int) -> bool:
        """Account a dump in flight, evicting LRU objects first if it would exceed capacity."""
        capacity = self.capacity_bytes
        with self._lock:
            if capacity is None or self._bytes + self._in_flight + size <= capacity:
                self._in_flight += size
                return True
        if size > capacity:
            return False  # can never fit
        with self._scan_lock:
            with self._lock:
                over = self._bytes + self._in_flight + size > capacity
            if over:
                self._evict_locked(int(capacity * _LOW_WATERMARK) - size)
            with self._lock:
                self._in_flight += size
        return True

    def _evict_locked(self, target: int) -> None:
        """Rescan, then remove LRU objects until stored + in-flight bytes <= target."""
        seen = self._rescan_locked()
        with self._lock:
            current = self._bytes + self._in_flight
        entries = [ObjectEntry(k, p, s, m) for k, p, s, m in seen]
        removed = evict_lru(entries, current, max(target, 0))
        for entry in removed:
            self._unindexed(entry.key)
        with self._lock:
            self._stats.evictions += len(removed)

    def _write_failed(self, exc: OSError, path: str) -> None:
        if exc.errno in _READ_ONLY_ERRNOS:
            self._refuse_dumps(path, exc)
        else:
            self._log_once(exc, path, "write")

    def _refuse_dumps(self, path: str, exc: OSError) -> None:
        with self._lock:
            if self._stats.read_only_reason is not None:
                return
            name = errno.errorcode.get(exc.errno or 0, "error")
            self._stats.read_only_reason = f"{name}: {exc.strerror} writing {path}"
        log.error(
            "UCM store %s: cannot write %s: %s (%s); dumps are now refused, loads continue",
            self.root,
            path,
            exc.strerror,
            name,
        )

    def _log_once(self, exc: OSError, path: str, what: str) -> None:
        code = exc.errno or 0
        if code not in self._logged_errors:
            self._logged_errors.add(code)
            log.warning(
                "UCM store: %s of %s failed: %s (further errors like it are only counted)", what, path, exc
            )

    def _count_dump(self, ok: bool, *, skipped: bool, nbytes: int) -> bool:
        with self._lock:
            if not ok:
                self._stats.dump_failures += 1
            elif skipped:
                self._stats.dump_skipped += 1
            else:
                self._stats.dumps += 1
                self._stats.dumped_bytes += nbytes
        return ok

    # -- the rest ---------------------------------------------------------------------------------

    def remove(self, keys: Sequence[Key]) -> int:
        check_keys(keys)
        removed = 0
        for key in keys:
            try:
                os.unlink(object_path(self._objects, key))
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._log_once(exc, object_path(self._objects, key), "remove")
            self._unindexed(key)
        return removed

    def touch(self, keys: Sequence[Key]) -> int:
        """Sets each object's mtime (the LRU clock) to now: one metadata write per object, spread
        over the I/O threads (each is an RPC on NFS). A store that cannot write (read-only) only
        counts what exists; an object found gone leaves the index."""
        check_keys(keys)
        return sum(self._in_chunks(self._touch_many, list(keys)))

    def _touch_many(self, keys: list[bytes]) -> list[bool]:
        if self._stats.read_only_reason is not None:
            return self._stat_many(keys)
        present = []
        for key in keys:
            path = object_path(self._objects, key)
            try:
                os.utime(path)
                present.append(True)
            except FileNotFoundError:
                self._unindexed(key)
                present.append(False)
            except OSError as exc:
                self._log_once(exc, path, "touch")
                present.append(self._stat_present(key))
        return present

    def stats(self) -> StoreStats:
        with self._lock:
            snapshot = StoreStats(**self._stats.as_dict())  # type: ignore[arg-type]
            snapshot.blocks = len(self._index)
            snapshot.bytes = self._bytes
        return snapshot

    def close(self) -> None:
        # Join the background scan too: it creates shard directories, and a caller that removes
        # the store's directory right after close() must not race it.
        with self._lock:
            refresher = self._refresher
        if refresher is not None:
            refresher.join()
        self._pool.shutdown(wait=True)
        self._verify_pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"FileStore({self.root!r}, salt={self.salt.hex()})"


class _LayoutMismatch(Exception):
    """A sound object whose layout differs from the caller's: a miss, but not damage."""
