"""A small NFSv3 client over ONC RPC/TCP (RFC 1813, RFC 5531), in pure Python.

Why it exists: this project's test and bench machines run a kernel without the `nfs` and `nfsd`
modules (and cannot load any), so the kernel NFS client cannot mount anything. The user-space
server (NFS-Ganesha) speaks the real protocol; this client speaks it too, and `nfs_fuse.py`
mounts it through FUSE so the store's ordinary `os.*` calls travel as real NFS RPCs to a real
server. Every RPC goes through `RpcClient.call`, which counts it per procedure: those counters
play the part of `/proc/self/mountstats` (the kernel client's counters), which this machine lacks.

Semantics follow a *soft* kernel mount: a call that gets no reply within `timeout_s` (server
dead or restarting) is retried on a fresh connection until `retry_s` has passed, then fails with
EIO, so a caller sees an error, never a hang and never wrong bytes.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

NFS_PROGRAM, NFS_V3 = 100003, 3
MOUNT_PROGRAM, MOUNT_V3 = 100005, 3

PROC_NAMES = {
    0: "NULL", 1: "GETATTR", 2: "SETATTR", 3: "LOOKUP", 4: "ACCESS", 6: "READ", 7: "WRITE",
    8: "CREATE", 9: "MKDIR", 12: "REMOVE", 13: "RMDIR", 14: "RENAME", 15: "LINK",
    17: "READDIRPLUS", 18: "FSSTAT", 19: "FSINFO", 21: "COMMIT",
}
# nfsstat3 values that are not Linux errno numbers (RFC 1813 section 2.6)
_NFS_TO_ERRNO = {70: errno.ESTALE, 10001: errno.EBADF, 10004: errno.EOPNOTSUPP,
                 10006: errno.EIO, 10008: errno.EAGAIN, 10002: errno.EAGAIN, 10003: errno.EINVAL}
NF3REG, NF3DIR = 1, 2
UNSTABLE, FILE_SYNC = 0, 2


class NfsError(OSError):
    """An NFS status (or a dead server) as the errno a local filesystem would raise."""

    def __init__(self, status: int, what: str) -> None:
        code = _NFS_TO_ERRNO.get(status, status)
        super().__init__(code, f"{os.strerror(code)} (NFS status {status} in {what})")


@dataclass(frozen=True)
class Attr:
    """The fattr3 fields a stat(2) needs."""

    ftype: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    fileid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Packer:
    """XDR encoding into one growing buffer."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack(">I", v))

    def u64(self, v: int) -> None:
        self.parts.append(struct.pack(">Q", v))

    def opaque(self, data: bytes) -> None:
        self.u32(len(data))
        self.fixed(data)

    def fixed(self, data: bytes) -> None:
        self.parts.append(data)
        if len(data) % 4:
            self.parts.append(bytes(4 - len(data) % 4))

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class Unpacker:
    """XDR decoding from one reply."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def u32(self) -> int:
        (v,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        (v,) = struct.unpack_from(">Q", self.data, self.pos)
        self.pos += 8
        return int(v)

    def fixed(self, n: int) -> bytes:
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n + (-n % 4)
        return out

    def opaque(self) -> bytes:
        return self.fixed(self.u32())

    def time_ns(self) -> int:
        sec = self.u32()
        return sec * 1_000_000_000 + self.u32()

    def fattr(self) -> Attr:
        ftype, mode, nlink, uid, gid = (self.u32() for _ in range(5))
        size, used = self.u64(), self.u64()
        self.pos += 8 + 8  # rdev, fsid
        fileid = self.u64()
        return Attr(ftype, mode, nlink, uid, gid, size, used, fileid, self.time_ns(), self.time_ns(), self.time_ns())

    def post_op_attr(self) -> Attr | None:
        return self.fattr() if self.u32() else None

    def wcc_data(self) -> Attr | None:
        if self.u32():
            self.pos += 8 + 8 + 8  # pre-op size, mtime, ctime
        return self.post_op_attr()

    def post_op_fh(self) -> bytes | None:
        return self.opaque() if self.u32() else None


class _Pending:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: bytes | None = None


class RpcClient:
    """One TCP connection to one RPC program, shared by many threads: calls are sent under a
    lock and a reader thread hands each reply to the caller waiting on its xid."""

    def __init__(self, host: str, port: int, program: int, version: int, *,
                 timeout_s: float = 5.0, retry_s: float = 10.0) -> None:
        self.address = (host, port)
        self.program, self.version = program, version
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.counts: Counter[str] = Counter()  # RPCs sent, per procedure (retransmissions included)
        self.retransmits = 0
        self._xids = itertools.count(int.from_bytes(os.urandom(3), "big"))
        self._lock = threading.Lock()  # socket, pending table, counters
        self._sock: socket.socket | None = None
        self._pending: dict[int, _Pending] = {}
        self._cred = self._auth_sys()

    @staticmethod
    def _auth_sys() -> bytes:
        p = Packer()
        p.u32(0)
        p.opaque(b"ucm")
        p.u32(os.getuid())
        p.u32(os.getgid())
        p.u32(0)
        return p.bytes()

    def _connect_locked(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self.address, timeout=self.timeout_s)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            threading.Thread(target=self._reader, args=(sock,), name="nfs-rpc-reader", daemon=True).start()
        return self._sock

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            if self._sock is sock:
                self._sock = None
                waiting = list(self._pending.values())
                self._pending.clear()
            else:
                waiting = []
        try:
            sock.close()
        except OSError:
            pass
        for pending in waiting:
            pending.event.set()  # reply None: the caller retries on a new connection

    def _reader(self, sock: socket.socket) -> None:
        try:
            while True:
                record = b""
                last = False
                while not last:
                    (mark,) = struct.unpack(">I", _recv_exact(sock, 4))
                    last = bool(mark & 0x80000000)
                    record += _recv_exact(sock, mark & 0x7FFFFFFF)
                (xid,) = struct.unpack_from(">I", record)
                with self._lock:
                    pending = self._pending.pop(xid, None)
                if pending is not None:
                    pending.reply = record
                    pending.event.set()
        except (OSError, struct.error):
            self._drop(sock)

    def call(self, proc: int, args: bytes) -> Unpacker:
        """Send one call; return an unpacker positioned at the procedure's results."""
        name = PROC_NAMES.get(proc, str(proc))
        deadline = time.monotonic() + self.retry_s
        first = True
        while True:
            xid = next(self._xids) & 0xFFFFFFFF
            header = struct.pack(">IIIIII", xid, 0, 2, self.program, self.version, proc)
            message = header + struct.pack(">I", 1) + _opaque(self._cred) + struct.pack(">II", 0, 0) + args
            pending = _Pending()
            sock = None
            with self._lock:
                self.counts[name] += 1
                if not first:
                    self.retransmits += 1
                try:
                    sock = self._connect_locked()
                    self._pending[xid] = pending
                    sock.sendall(struct.pack(">I", 0x80000000 | len(message)) + message)
                except OSError:
                    self._pending.pop(xid, None)
            first = False
            if sock is not None and pending.event.wait(self.timeout_s) and pending.reply is not None:
                return _accepted(pending.reply, name)
            with self._lock:
                self._pending.pop(xid, None)
            if sock is not None and pending.reply is None and not pending.event.is_set():
                self._drop(sock)  # no reply in time: assume the connection is dead
            if time.monotonic() >= deadline:
                raise NfsError(errno.EIO, f"{name}: no reply from {self.address[0]}:{self.address[1]}")
            time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            self._drop(sock)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _opaque(data: bytes) -> bytes:
    p = Packer()
    p.opaque(data)
    return p.bytes()


def _accepted(reply: bytes, name: str) -> Unpacker:
    u = Unpacker(reply)
    u.pos = 4
    if u.u32() != 1:
        raise NfsError(errno.EIO, f"{name}: not a reply")
    if u.u32() != 0:
        raise NfsError(errno.EACCES, f"{name}: call denied")
    u.u32()
    u.opaque()  # verifier
    status = u.u32()
    if status != 0:
        raise NfsError(errno.EIO, f"{name}: RPC accept status {status}")
    return u
