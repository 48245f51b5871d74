"""The NFSv3 procedures (RFC 1813) the FUSE client needs, each exactly one RPC.

Kept apart from the RPC transport (`nfs_rpc.py`) so each stays small; `nfs_fuse.py` decides when
to call them (its attribute cache and close-to-open rules are where the RPC count is decided).
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from nfs_rpc import (
    FILE_SYNC,
    MOUNT_PROGRAM,
    MOUNT_V3,
    NFS_PROGRAM,
    NFS_V3,
    Attr,
    NfsError,
    Packer,
    RpcClient,
    Unpacker,
)

GUARDED = 1
_TIME_DONT, _TIME_SERVER, _TIME_CLIENT = 0, 1, 2


@dataclass(frozen=True)
class DirEntry:
    name: str
    fh: bytes | None
    attr: Attr | None


@dataclass(frozen=True)
class FsStat:
    total: int
    free: int
    avail: int
    files: int
    ffree: int


def _status(u: Unpacker, what: str) -> int:
    return u.u32()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise NfsError(status, what)


def _sattr(mode: int | None = None, size: int | None = None,
           times_ns: tuple[int, int] | None = None, server_time: bool = False) -> bytes:
    p = Packer()
    for value in (mode, None, None):  # mode, uid, gid
        p.u32(0 if value is None else 1)
        if value is not None:
            p.u32(value)
    p.u32(0 if size is None else 1)
    if size is not None:
        p.u64(size)
    for i in range(2):  # atime, mtime
        if times_ns is not None:
            p.u32(_TIME_CLIENT)
            p.u32(times_ns[i] // 1_000_000_000)
            p.u32(times_ns[i] % 1_000_000_000)
        else:
            p.u32(_TIME_SERVER if server_time else _TIME_DONT)
    return p.bytes()


def _diropargs(dir_fh: bytes, name: str) -> Packer:
    p = Packer()
    p.opaque(dir_fh)
    p.opaque(name.encode("utf-8", "surrogateescape"))
    return p


class Nfs3:
    """One mounted export: the root file handle and the NFS program's RPC connection."""

    def __init__(self, host: str, export: str, *, nfs_port: int, mount_port: int,
                 timeout_s: float = 5.0, retry_s: float = 10.0) -> None:
        self.host, self.export = host, export
        self.rpc = RpcClient(host, nfs_port, NFS_PROGRAM, NFS_V3, timeout_s=timeout_s, retry_s=retry_s)
        self.root = self._mount(mount_port, timeout_s, retry_s)
        self.rsize, self.wsize = self._fsinfo()

    def _mount(self, port: int, timeout_s: float, retry_s: float) -> bytes:
        mnt = RpcClient(self.host, port, MOUNT_PROGRAM, MOUNT_V3, timeout_s=timeout_s, retry_s=retry_s)
        try:
            p = Packer()
            p.opaque(self.export.encode())
            u = mnt.call(1, p.bytes())
            status = u.u32()
            if status != 0:
                raise NfsError(status, f"MOUNT of {self.host}:{self.export}")
            return u.opaque()
        finally:
            mnt.close()

    def _fsinfo(self) -> tuple[int, int]:
        p = Packer()
        p.opaque(self.root)
        u = self.rpc.call(19, p.bytes())
        _check(u.u32(), "FSINFO")
        u.post_op_attr()
        rtmax, _rtpref, _rtmult, wtmax = u.u32(), u.u32(), u.u32(), u.u32()
        return min(rtmax, 1 << 20), min(wtmax, 1 << 20)

    def getattr(self, fh: bytes) -> Attr:
        p = Packer()
        p.opaque(fh)
        u = self.rpc.call(1, p.bytes())
        _check(u.u32(), "GETATTR")
        return u.fattr()

    def setattr(self, fh: bytes, *, mode: int | None = None, size: int | None = None,
                times_ns: tuple[int, int] | None = None, server_time: bool = False) -> Attr | None:
        p = Packer()
        p.opaque(fh)
        p.fixed(_sattr(mode, size, times_ns, server_time))
        p.u32(0)  # no guard
        u = self.rpc.call(2, p.bytes())
        status = u.u32()
        attr = u.wcc_data()
        _check(status, "SETATTR")
        return attr

    def lookup(self, dir_fh: bytes, name: str) -> tuple[bytes, Attr]:
        u = self.rpc.call(3, _diropargs(dir_fh, name).bytes())
        status = u.u32()
        if status != 0:
            raise NfsError(status, f"LOOKUP {name}")
        fh = u.opaque()
        attr = u.post_op_attr()
        return fh, attr if attr is not None else self.getattr(fh)

    def read(self, fh: bytes, offset: int, count: int) -> tuple[bytes, bool]:
        p = Packer()
        p.opaque(fh)
        p.u64(offset)
        p.u32(count)
        u = self.rpc.call(6, p.bytes())
        status = u.u32()
        u.post_op_attr()
        _check(status, "READ")
        u.u32()
        eof = bool(u.u32())
        return u.opaque(), eof

    def write(self, fh: bytes, offset: int, data: bytes, stable: int) -> int:
        p = Packer()
        p.opaque(fh)
        p.u64(offset)
        p.u32(len(data))
        p.u32(stable)
        p.opaque(data)
        u = self.rpc.call(7, p.bytes())
        status = u.u32()
        u.wcc_data()
        _check(status, "WRITE")
        return u.u32()

    def commit(self, fh: bytes) -> None:
        p = Packer()
        p.opaque(fh)
        p.u64(0)
        p.u32(0)
        u = self.rpc.call(21, p.bytes())
        _check(u.u32(), "COMMIT")

    def create(self, dir_fh: bytes, name: str, mode: int, exclusive: bool) -> tuple[bytes, Attr]:
        p = _diropargs(dir_fh, name)
        p.u32(GUARDED if exclusive else 0)
        p.fixed(_sattr(mode & 0o7777))
        return self._new_object(8, p, f"CREATE {name}", dir_fh, name)

    def mkdir(self, dir_fh: bytes, name: str, mode: int) -> tuple[bytes, Attr]:
        p = _diropargs(dir_fh, name)
        p.fixed(_sattr(mode & 0o7777))
        return self._new_object(9, p, f"MKDIR {name}", dir_fh, name)

    def _new_object(self, proc: int, p: Packer, what: str, dir_fh: bytes, name: str) -> tuple[bytes, Attr]:
        u = self.rpc.call(proc, p.bytes())
        status = u.u32()
        if status != 0:
            raise NfsError(status, what)
        fh = u.post_op_fh()
        attr = u.post_op_attr()
        if fh is None:
            return self.lookup(dir_fh, name)
        return fh, attr if attr is not None else self.getattr(fh)

    def remove(self, dir_fh: bytes, name: str, *, directory: bool = False) -> None:
        u = self.rpc.call(13 if directory else 12, _diropargs(dir_fh, name).bytes())
        _check(u.u32(), f"{'RMDIR' if directory else 'REMOVE'} {name}")

    def rename(self, from_dir: bytes, from_name: str, to_dir: bytes, to_name: str) -> None:
        p = _diropargs(from_dir, from_name)
        p.fixed(_diropargs(to_dir, to_name).bytes())
        u = self.rpc.call(14, p.bytes())
        _check(u.u32(), f"RENAME {from_name} {to_name}")

    def link(self, fh: bytes, dir_fh: bytes, name: str) -> None:
        p = Packer()
        p.opaque(fh)
        p.fixed(_diropargs(dir_fh, name).bytes())
        u = self.rpc.call(15, p.bytes())
        _check(u.u32(), f"LINK {name}")

    def readdirplus(self, dir_fh: bytes) -> list[DirEntry]:
        """Every entry with its handle and attributes, in as few READDIRPLUS calls as the
        server's reply size allows (this is what makes a directory scan cheap on NFS)."""
        entries: list[DirEntry] = []
        cookie, verf = 0, bytes(8)
        while True:
            p = Packer()
            p.opaque(dir_fh)
            p.u64(cookie)
            p.fixed(verf)
            p.u32(64 * 1024)
            p.u32(1 << 20)
            u = self.rpc.call(17, p.bytes())
            status = u.u32()
            u.post_op_attr()
            _check(status, "READDIRPLUS")
            verf = u.fixed(8)
            while u.u32():
                u.u64()
                name = u.opaque().decode("utf-8", "surrogateescape")
                cookie = u.u64()
                attr = u.post_op_attr()
                fh = u.post_op_fh()
                if name not in (".", ".."):
                    entries.append(DirEntry(name, fh, attr))
            if u.u32():
                return entries

    def fsstat(self) -> FsStat:
        p = Packer()
        p.opaque(self.root)
        u = self.rpc.call(18, p.bytes())
        status = u.u32()
        u.post_op_attr()
        _check(status, "FSSTAT")
        total, free, avail, files, ffree = (u.u64() for _ in range(5))
        return FsStat(total, free, avail, files, ffree)


def wait_for_server(host: str, port: int, timeout_s: float) -> None:
    """Block until the server accepts TCP connections (after a start or restart)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise NfsError(errno.ETIMEDOUT, f"NFS server {host}:{port} not up after {timeout_s:.0f} s: {exc}") from exc
            time.sleep(0.1)


__all__ = ["FILE_SYNC", "Attr", "DirEntry", "FsStat", "Nfs3", "NfsError", "wait_for_server"]
