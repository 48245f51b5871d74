"""Mount an NFSv3 export through FUSE: a user-space NFS client for kernels without the `nfs` module.

    python scripts/nfs_fuse.py --server 127.0.0.1 --export /srv/x --mountpoint /mnt/x [--retry-s 10]

Runs in the foreground until the mount point is unmounted (`fusermount3 -u` or `umount`).

Caching follows the kernel client's defaults, because the store's correctness and its RPC count
on NFS both depend on them:

* attributes and name -> handle lookups are cached for 3 s (files) and 30 s (directories), like
  `acregmin`/`acdirmin`; misses are not cached (every stat of an absent name is one LOOKUP);
* close-to-open: every open looks the name up again (one LOOKUP, which returns the handle and
  attributes), and FUSE drops the file's page cache on open, so a reader sees what a writer on
  another mount closed before the open;
* writes go out as UNSTABLE WRITEs and a close (or fsync) sends one COMMIT, as the kernel does;
* a READDIRPLUS primes the cache with every entry's handle and attributes, so a directory scan
  followed by stats costs the READDIRPLUS calls only.

The kernel side of FUSE caches nothing (entry/attr timeouts 0), so every decision is made here.
`<mount>/.ucm-nfs-stats` (not listed, not on the server) is a JSON snapshot of the RPCs sent per
procedure: this client's `/proc/self/mountstats`.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mfusepy
from nfs_rpc import NF3DIR, UNSTABLE, Attr, NfsError
from nfs_v3 import Nfs3

STATS_NAME = ".ucm-nfs-stats"
_STATS_SIZE = 4096  # fixed, so the size stat(2) reports never disagrees with what a read returns
_AC_FILE_S, _AC_DIR_S = 3.0, 30.0


@dataclass
class _Node:
    fh: bytes
    attr: Attr
    expires: float


@dataclass
class _Open:
    path: str
    fh: bytes
    dirty: bool = False
    snapshot: bytes | None = None  # the stats file's content at open


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent or "/", name


class NfsFs(mfusepy.Operations):  # type: ignore[misc]
    """FUSE operations on top of one `Nfs3` mount; see the module docstring for the caching rules."""

    use_ns = True

    def __init__(self, nfs: Nfs3) -> None:
        self.nfs = nfs
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._open: dict[int, _Open] = {}
        self._next_handle = 1

    # -- name and attribute cache -----------------------------------------------------------

    def _remember(self, path: str, fh: bytes, attr: Attr) -> _Node:
        ttl = _AC_DIR_S if attr.ftype == NF3DIR else _AC_FILE_S
        node = _Node(fh, attr, time.monotonic() + ttl)
        with self._lock:
            self._nodes[path] = node
        return node

    def _forget(self, path: str) -> None:
        with self._lock:
            self._nodes.pop(path, None)
            prefix = path.rstrip("/") + "/"
            for stale in [p for p in self._nodes if p.startswith(prefix)]:
                del self._nodes[stale]

    def _node(self, path: str, *, fresh: bool = False) -> _Node:
        if not fresh:
            with self._lock:
                node = self._nodes.get(path)
            if node is not None and node.expires > time.monotonic():
                return node
        if path == "/":
            return self._remember("/", self.nfs.root, self.nfs.getattr(self.nfs.root))
        parent, name = _split(path)
        try:
            fh, attr = self.nfs.lookup(self._node(parent).fh, name)
        except NfsError as exc:
            if exc.errno == errno.ESTALE:  # the parent went away on the server: look it up again
                self._forget(parent)
                fh, attr = self.nfs.lookup(self._node(parent, fresh=True).fh, name)
            else:
                if exc.errno == errno.ENOENT:
                    self._forget(path)
                raise
        return self._remember(path, fh, attr)

    def _updated(self, path: str, attr: Attr | None) -> None:
        if attr is None:
            self._forget(path)
            return
        with self._lock:
            node = self._nodes.get(path)
        if node is not None:
            self._remember(path, node.fh, attr)

    # -- attributes --------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == "/" + STATS_NAME:
            now = time.time_ns()
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": _STATS_SIZE,
                    "st_atime": now, "st_mtime": now, "st_ctime": now}
        a = self._node(path).attr
        kind = stat.S_IFDIR if a.ftype == NF3DIR else stat.S_IFREG if a.ftype == 1 else stat.S_IFLNK
        return {"st_mode": kind | (a.mode & 0o7777), "st_nlink": a.nlink, "st_uid": a.uid, "st_gid": a.gid,
                "st_size": a.size, "st_blocks": (a.used + 511) // 512, "st_ino": a.fileid,
                "st_atime": a.atime_ns, "st_mtime": a.mtime_ns, "st_ctime": a.ctime_ns}

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        attr = self.nfs.setattr(self._node(path).fh, times_ns=times, server_time=times is None)
        self._updated(path, attr)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self._updated(path, self.nfs.setattr(self._node(path).fh, mode=mode & 0o7777))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0  # the export squashes nothing for root; ownership changes are not needed here

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._updated(path, self.nfs.setattr(self._node(path).fh, size=length))
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        s = self.nfs.fsstat()
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": s.total // 4096, "f_bfree": s.free // 4096,
                "f_bavail": s.avail // 4096, "f_files": s.files, "f_ffree": s.ffree, "f_namemax": 255}

    # -- names -------------------------------------------------------------------------------

    def readdir_with_offset(self, path: str, offset: int, fh: int) -> Iterator[tuple[str, None, int]]:
        """The whole listing from READDIRPLUS (FUSE asks again with the offset it stopped at)."""
        entries = self.nfs.readdirplus(self._node(path).fh)
        base = path.rstrip("/")
        for entry in entries:
            if entry.fh is not None and entry.attr is not None:
                self._remember(f"{base}/{entry.name}", entry.fh, entry.attr)
        names = [".", "..", *(e.name for e in entries)]
        return iter([(name, None, i + 1) for i, name in enumerate(names) if i >= offset])

    def mkdir(self, path: str, mode: int) -> int:
        parent, name = _split(path)
        fh, attr = self.nfs.mkdir(self._node(parent).fh, name, mode)
        self._remember(path, fh, attr)
        return 0

    def rmdir(self, path: str) -> int:
        parent, name = _split(path)
        self._forget(path)
        self.nfs.remove(self._node(parent).fh, name, directory=True)
        return 0

    def unlink(self, path: str) -> int:
        parent, name = _split(path)
        self._forget(path)
        self.nfs.remove(self._node(parent).fh, name)
        return 0

    def rename(self, old: str, new: str) -> int:
        (old_parent, old_name), (new_parent, new_name) = _split(old), _split(new)
        self._forget(old)
        self._forget(new)
        self.nfs.rename(self._node(old_parent).fh, old_name, self._node(new_parent).fh, new_name)
        return 0

    def link(self, target: str, source: str) -> int:
        parent, name = _split(target)
        self.nfs.link(self._node(source).fh, self._node(parent).fh, name)
        self._forget(source)  # its link count changed
        return 0

    # -- files -------------------------------------------------------------------------------

    def _handle(self, entry: _Open) -> int:
        with self._lock:
            handle = self._next_handle
            self._next_handle += 1
            self._open[handle] = entry
        return handle

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        parent, name = _split(path)
        fh, attr = self.nfs.create(self._node(parent).fh, name, mode, exclusive=bool(flags & os.O_EXCL))
        self._remember(path, fh, attr)
        return self._handle(_Open(path, fh))

    def open(self, path: str, flags: int) -> int:
        if path == "/" + STATS_NAME:
            return self._handle(_Open(path, b"", snapshot=self.stats_json()))
        node = self._node(path, fresh=True)  # close-to-open: revalidate the name on every open
        return self._handle(_Open(path, node.fh))

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        entry = self._open[fh]
        if entry.snapshot is not None:
            return entry.snapshot[offset : offset + size]
        chunks = []
        while size > 0:
            data, eof = self.nfs.read(entry.fh, offset, min(size, self.nfs.rsize))
            chunks.append(data)
            offset += len(data)
            size -= len(data)
            if eof or not data:
                break
        return b"".join(chunks)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        entry = self._open[fh]
        done = 0
        while done < len(data):
            part = data[done : done + self.nfs.wsize]
            done += self.nfs.write(entry.fh, offset + done, part, UNSTABLE)
        entry.dirty = True
        with self._lock:
            node = self._nodes.get(entry.path)
        if node is not None and offset + done > node.attr.size:
            grown = Attr(**{**node.attr.__dict__, "size": offset + done})
            self._remember(entry.path, node.fh, grown)
        return done

    def _commit(self, entry: _Open) -> None:
        if entry.dirty:
            self.nfs.commit(entry.fh)
            entry.dirty = False

    def flush(self, path: str, fh: int) -> int:
        self._commit(self._open[fh])
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._commit(self._open[fh])
        return 0

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            entry = self._open.pop(fh)
        self._commit(entry)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0  # NFSv3 directory operations are synchronous on the server

    def stats_json(self) -> bytes:
        rpc = self.nfs.rpc
        with rpc._lock:
            body = {"server": f"{self.nfs.host}:{self.nfs.export}", "rpcs": dict(rpc.counts),
                    "total": sum(rpc.counts.values()), "retransmits": rpc.retransmits}
        data = json.dumps(body).encode()
        return data + b" " * (_STATS_SIZE - len(data))


class _Fuse(mfusepy.FUSE):  # type: ignore[misc]
    """NFSv3 has no RENAME_NOREPLACE: refuse rename flags (EINVAL), as the kernel NFS client
    does, instead of mfusepy's default of silently dropping them (which would turn the store's
    first-writer-wins publish into last-writer-wins). The store then falls back to link()."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if flags:
            return -errno.EINVAL
        return int(self.rename_fuse_2(old, new))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--export", required=True, help="the export's path on the server")
    parser.add_argument("--mountpoint", required=True)
    parser.add_argument("--nfs-port", type=int, default=2049)
    parser.add_argument("--mount-port", type=int, default=20048)
    parser.add_argument("--timeout-s", type=float, default=2.0, help="wait for one reply (soft mount timeo)")
    parser.add_argument("--retry-s", type=float, default=10.0, help="give up with EIO after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="nfs_fuse: %(message)s")
    nfs = Nfs3(args.server, args.export, nfs_port=args.nfs_port, mount_port=args.mount_port,
               timeout_s=args.timeout_s, retry_s=args.retry_s)
    _Fuse(NfsFs(nfs), args.mountpoint, foreground=True, fsname=f"{args.server}:{args.export}",
          subtype="ucmnfs", attr_timeout=0, entry_timeout=0, negative_timeout=0, use_ino=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
