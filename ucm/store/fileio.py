"""Low-level file I/O for the store: full positional reads/writes and aligned buffers.

Why: `os.preadv`/`os.pwritev` move bytes straight between the kernel and the caller's buffer
with the GIL released, so a thread pool overlaps many block transfers without a Python-level
copy. O_DIRECT needs every buffer address and length aligned to the device's logical block
size; `AlignedBuffer` gets page-aligned memory from an anonymous mmap (always 4,096-aligned),
used as a bounce buffer when the caller's memory is not aligned.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

ALIGN = 4096


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def address_of(buf: memoryview) -> int:
    """Address of a buffer's first byte (works for read-only buffers too)."""
    if buf.nbytes == 0:
        return 0
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def is_aligned(buf: memoryview) -> bool:
    return address_of(buf) % ALIGN == 0 and buf.nbytes % ALIGN == 0


def copy_bytes(dst: memoryview, src: memoryview) -> None:
    """memcpy with the GIL released (ctypes releases it around foreign calls)."""
    if src.nbytes != dst.nbytes:
        raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
    if src.nbytes:
        ctypes.memmove(address_of(dst), address_of(src), src.nbytes)


class AlignedBuffer:
    """Page-aligned anonymous memory, grown on demand (never shrunk)."""

    def __init__(self, size: int = ALIGN) -> None:
        self._map = mmap.mmap(-1, align_up(max(size, ALIGN)))

    def view(self, size: int) -> memoryview:
        if size > len(self._map):
            old, self._map = self._map, mmap.mmap(-1, align_up(size))
            try:
                old.close()
            except BufferError:
                pass  # a view of it is still alive; the memory goes when that view does
        return memoryview(self._map)[:size]


class ThreadBuffers(threading.local):
    """One bounce buffer per I/O thread."""

    def __init__(self) -> None:
        self.buffer = AlignedBuffer()

    def get(self, size: int) -> memoryview:
        return self.buffer.view(size)


def _advance(pending: list[memoryview], done: int) -> None:
    """Drop the first `done` bytes from the iovec list (whole buffers, then a slice of the next)."""
    while pending and done >= pending[0].nbytes:
        done -= pending[0].nbytes
        pending.pop(0)
    if done:
        pending[0] = pending[0][done:]


def pwrite_all(fd: int, buffers: Sequence[memoryview], offset: int) -> None:
    """Write every buffer at `offset` consecutively, retrying partial writes."""
    pending = [b for b in buffers if b.nbytes]
    while pending:
        written = os.pwritev(fd, pending, offset)
        if written <= 0:
            raise OSError(f"pwritev wrote {written} bytes")
        offset += written
        _advance(pending, written)


def pread_full(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
    """Fill the buffers from `offset` until they are full or the file ends; bytes read."""
    pending = [b for b in buffers if b.nbytes]
    total = 0
    while pending:
        got = os.preadv(fd, pending, offset)
        if got == 0:
            break
        total += got
        offset += got
        _advance(pending, got)
    return total


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _load_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[..., int] = libc.renameat2
    except (OSError, AttributeError):
        return None
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: str, dst: str) -> bool:
    """Atomically rename `src` to `dst` unless `dst` exists (FileExistsError). One metadata
    operation, where link+unlink takes two. Returns False (nothing done) where the kernel or
    filesystem lacks RENAME_NOREPLACE (e.g. NFS), so the caller can fall back to link()."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise (
        OSError(code, os.strerror(code), dst)
        if code != errno.EEXIST
        else FileExistsError(code, os.strerror(code), dst)
    )


NO_LINK_ERRNOS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


class Publisher:
    """Makes a fully written temp file visible under its final name, atomically.

    Preference order: renameat2(RENAME_NOREPLACE) (one atomic metadata operation, first
    writer wins), then link()+unlink() (same semantics, two operations; NFS), then plain
    rename() where the filesystem has neither (last writer wins; same bytes anyway). Each
    fallback is remembered after the first time it is needed."""

    def __init__(self) -> None:
        self.use_noreplace = True
        self.use_link = True

    def publish(self, tmp: str, final: str) -> bool:
        """True if this call published; False when another writer had already (tmp removed)."""
        if self.use_noreplace:
            try:
                if rename_noreplace(tmp, final):
                    return True
            except FileExistsError:
                unlink_quietly(tmp)
                return False
            self.use_noreplace = False
        if self.use_link:
            try:
                os.link(tmp, final)
            except FileExistsError:
                unlink_quietly(tmp)
                return False
            except OSError as exc:
                if exc.errno not in NO_LINK_ERRNOS:
                    raise
                self.use_link = False  # e.g. a filesystem without hard links
            else:
                unlink_quietly(tmp)
                return True
        os.rename(tmp, final)
        return True


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def drop_cache(fd: int) -> None:
    """Ask the kernel to drop this file's clean pages (after fsync), so the next read hits the disk."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def prefetch(fd: int) -> None:
    """Start reading the whole file into the page cache now (POSIX_FADV_WILLNEED), so the read
    that follows waits for I/O already in flight instead of issuing it a readahead window at a
    time: one file per block gets no readahead from its neighbours."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
