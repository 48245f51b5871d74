"""`ucm.store.rpc_counters`: reading an NFS client's RPC counters for the mount under a path."""

from __future__ import annotations

import pathlib

from ucm.store import rpc_counters

# the layout of /proc/self/mountstats as Linux 6.x writes it (two NFS mounts and a local one)
MOUNTSTATS = """device sysfs mounted on /sys with fstype sysfs
device srv:/export mounted on /mnt/other with fstype nfs statvers=1.1
\topts:\trw,vers=3,rsize=1048576,wsize=1048576,namlen=255,acregmin=3
\tRPC iostats version: 1.1  p/v: 100003/3 (nfs)
\txprt:\ttcp 0 0 1 0 11 51 51 0 51 0 2 0 0
\tper-op statistics
\t        NULL: 1 1 0 44 24 0 0 0 0
\t      LOOKUP: 999 999 0 0 0 0 0 0 0
device srv:/export mounted on /mnt/ucm with fstype nfs statvers=1.1
\topts:\trw,vers=3
\tRPC iostats version: 1.1  p/v: 100003/3 (nfs)
\tper-op statistics
\t        NULL: 1 1 0 44 24 0 0 0 0
\t     GETATTR: 11 12 0 1232 1232 0 1 1 0
\t      LOOKUP: 8192 8192 0 1310720 983040 0 25 40 0
device tmpfs mounted on /tmp with fstype tmpfs
"""


def test_the_kernel_clients_per_op_counts_of_the_right_mount() -> None:
    counts = rpc_counters.parse_mountstats(MOUNTSTATS, "/mnt/ucm")
    assert counts == {"NULL": 1, "GETATTR": 11, "LOOKUP": 8192}  # ops, not transmissions
    assert rpc_counters.parse_mountstats(MOUNTSTATS, "/mnt/absent") is None
    assert rpc_counters.parse_mountstats(MOUNTSTATS, "/tmp") is None  # not NFS


def test_a_local_directory_has_no_rpc_counters(tmp_path: pathlib.Path) -> None:
    assert rpc_counters.mount_of(str(tmp_path)) is not None
    assert rpc_counters.rpc_counts(str(tmp_path)) is None


def test_delta_keeps_only_procedures_that_moved() -> None:
    assert rpc_counters.delta({"LOOKUP": 5, "READ": 2}, {"LOOKUP": 9, "READ": 2, "WRITE": 1}) == {
        "LOOKUP": 4, "WRITE": 1}
    assert rpc_counters.delta(None, {"LOOKUP": 1}) is None
