"""How many RPCs the NFS client of a store's mount has sent: the unit of cost on NFS.

A lookup, a load or a dump on NFS costs round trips to the server, and wall time on a loopback
server hides them; so `ucm store bench` reads the client's own counters before and after each
measured step. Two clients are understood:

* the kernel NFS client: the per-op table of the mount in `/proc/self/mountstats`
  ("LOOKUP: <ops> <transmissions> ...");
* the user-space FUSE client used where the kernel has no NFS (scripts/nfs_fuse.py, fstype
  `fuse.ucmnfs`): the JSON snapshot at `<mountpoint>/.ucm-nfs-stats`.

Anything else (a local disk) has no counters: `rpc_counts` returns None.
"""

from __future__ import annotations

import json
import os

FUSE_NFS_TYPE = "fuse.ucmnfs"
FUSE_STATS_NAME = ".ucm-nfs-stats"


def mount_of(path: str) -> tuple[str, str] | None:
    """(mountpoint, fstype) of the mount holding `path`, from /proc/self/mounts."""
    path = os.path.realpath(path)
    best: tuple[str, str] | None = None
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                mount, fstype = fields[1].replace("\\040", " "), fields[2]
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[0])):
                    best = (mount, fstype)
    except OSError:
        return None
    return best


def _kernel_counts(mountpoint: str) -> dict[str, int] | None:
    try:
        with open("/proc/self/mountstats", encoding="utf-8") as f:
            return parse_mountstats(f.read(), mountpoint)
    except OSError:
        return None


def parse_mountstats(text: str, mountpoint: str) -> dict[str, int] | None:
    """The per-op "ops" column of `mountpoint`'s section of a /proc/self/mountstats text
    (None if that mount is not listed as NFS)."""
    counts: dict[str, int] | None = None
    in_ops = False
    for line in text.splitlines():
        if line.startswith("device "):
            if counts is not None:
                break  # the next mount's section
            if f" mounted on {mountpoint} with fstype nfs" in line:
                counts = {}
            continue
        if counts is None:
            continue
        if line.strip() == "per-op statistics":
            in_ops = True
        elif in_ops and ":" in line:
            name, _, rest = line.strip().partition(":")
            numbers = rest.split()
            if numbers and numbers[0].isdigit():
                counts[name] = int(numbers[0])
    return counts


def rpc_counts(path: str) -> dict[str, int] | None:
    """RPCs sent so far per NFS procedure by the client of the mount holding `path`; None
    where that mount is not NFS (or its counters cannot be read)."""
    found = mount_of(path)
    if found is None:
        return None
    mountpoint, fstype = found
    if fstype == FUSE_NFS_TYPE:
        try:
            with open(os.path.join(mountpoint, FUSE_STATS_NAME), encoding="utf-8") as f:
                rpcs = json.load(f)["rpcs"]
        except (OSError, ValueError, KeyError):
            return None
        return {str(k): int(v) for k, v in rpcs.items()}
    if fstype in ("nfs", "nfs4"):
        return _kernel_counts(mountpoint)
    return None


def delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    """Per-procedure RPCs between two snapshots (procedures with none left out)."""
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}
