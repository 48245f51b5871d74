"""The demo's control plane: a private LocalCluster in the demo's work directory.

A private one (not the background `make cluster-up` cluster) so the demo never touches a
cluster someone else is using, and so "nothing left running" is checkable: every process that
belongs to the demo has the work directory in its command line or environment.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from e2e.access import ClusterAccess
from e2e.cluster import LocalCluster


def start_cluster(stack: contextlib.ExitStack, workdir: Path) -> ClusterAccess:
    """Starts the control plane under workdir/cluster; `stack` stops it (last, being first in)."""
    return stack.enter_context(LocalCluster(workdir / "cluster"))


def leftover_processes(marker: Path) -> list[str]:
    """'pid command' of every process (other than this one) whose command line or environment
    mentions `marker`: the demo's components, operator and tools all do, nothing else does."""
    needle = str(marker).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if needle in cmdline or needle in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{entry.name} {command}")
    return found
