"""A loopback NFS server (NFS-Ganesha) and two client mounts (scripts/nfs_fuse.py) per session.

The tests skip where the server or client cannot run (no root, no /dev/fuse, packages missing:
`make test` installs them with `scripts/nfs_loopback.py install`). In CI (`CI=true` or
`UCM_REQUIRE_NFS=1`) they fail instead, so a CI run can never pass without having exercised NFS.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))

from nfs_loopback import LoopbackNfs, NfsUnavailable, missing

REQUIRED = os.environ.get("UCM_REQUIRE_NFS") == "1" or os.environ.get("CI", "").lower() in ("1", "true")
RETRY_S = 1.0  # how long a client retries a dead server before EIO (soft mount)


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"loopback NFS is required here (CI/UCM_REQUIRE_NFS) but cannot run: {reason}")
    pytest.skip(f"loopback NFS unavailable: {reason}")


@pytest.fixture(scope="session")
def nfs() -> Iterator[LoopbackNfs]:
    if os.geteuid() != 0:
        _unavailable("needs root (Ganesha's ports, FUSE mounts)")
    if missing():
        _unavailable(f"missing {', '.join(missing())}; run `python scripts/nfs_loopback.py install`")
    root = pathlib.Path(tempfile.mkdtemp(prefix="ucm-nfs-"))
    server = LoopbackNfs(root, mounts=2, retry_s=RETRY_S)
    try:
        server.start()
    except NfsUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()
        if not any(os.path.ismount(m) for m in server.mountpoints):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def nfs_dirs(nfs: LoopbackNfs) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """One fresh directory as seen through mount 0, through mount 1 and on the server's disk."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    (nfs.mountpoints[0] / name).mkdir()
    return nfs.mountpoints[0] / name, nfs.mountpoints[1] / name, nfs.export / name
