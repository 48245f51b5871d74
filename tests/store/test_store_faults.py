"""Write faults (ENOSPC, EROFS, EACCES): one clear error, dumps refused, loads keep working.

These use real kernel faults: a tiny tmpfs, a read-only bind mount, and a child process
without the capabilities that let root bypass file permissions. Each skips, saying why, where
the machine does not allow it (no root, no mount permission, no setpriv).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from store_helpers import LAYOUT, SALT, payload_for, random_keys

from ucm.store import FileStore

MakeStore = Callable[..., FileStore]
REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def mount_point(tmp_path: pathlib.Path) -> Iterator[Callable[..., pathlib.Path]]:
    mounted: list[pathlib.Path] = []

    def mount(*args: str, target: pathlib.Path | None = None) -> pathlib.Path:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a tmpfs / bind mount")
        point = target or tmp_path / f"mnt{len(mounted)}"
        point.mkdir(exist_ok=True)
        done = _run("mount", *args, str(point))
        if done.returncode != 0:
            pytest.skip(f"mount not permitted here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        _run("umount", "-l", str(point))


def _loads_ok(store: FileStore, keys: list[bytes]) -> None:
    out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in keys]
    assert store.load(keys, out, LAYOUT).wait(10) == [True] * len(keys)
    assert all(np.array_equal(o, payload_for(k)) for o, k in zip(out, keys, strict=True))


def test_enospc_refuses_dumps_and_keeps_loading(
    mount_point: Callable[..., pathlib.Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = mount_point("-t", "tmpfs", "-o", "size=256k", "tmpfs")
    store = FileStore(root / "store", salt=SALT, io_threads=2)
    caplog.set_level(logging.ERROR, logger="ucm.store")
    keys = random_keys(20)  # 20 x 20 KiB objects > 256 KiB
    results = [store.dump([k], [payload_for(k)], LAYOUT).wait(10)[0] for k in keys]
    written = [k for k, ok in zip(keys, results, strict=True) if ok]
    assert 3 < len(written) < 20 and results == sorted(results, reverse=True)
    reason = store.stats().read_only_reason
    assert reason is not None and "ENOSPC" in reason and str(root) in reason
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(root) in errors[0].getMessage()
    _loads_ok(store, written)
    later = random_keys(1)
    assert store.dump(later, [payload_for(later[0])], LAYOUT).wait(10) == [False]
    assert not [n for _, _, files in os.walk(root) for n in files if n.endswith(".tmp")]
    store.close()


def test_read_only_filesystem(make_store: MakeStore, mount_point: Callable[..., pathlib.Path]) -> None:
    writer = make_store()
    keys = random_keys(5)
    assert writer.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10) == [True] * 5
    # the live store's directory turns read-only under it (e.g. an NFS export remounted ro)
    mount_point("--bind", str(writer.root), target=pathlib.Path(writer.root))
    done = _run("mount", "-o", "remount,bind,ro", writer.root)
    if done.returncode != 0:
        pytest.skip(f"read-only remount not permitted: {done.stderr.strip()}")
    fresh = random_keys(2)
    assert writer.dump(fresh, [payload_for(k) for k in fresh], LAYOUT).wait(10) == [False, False]
    reason = writer.stats().read_only_reason
    assert reason is not None and "EROFS" in reason and writer.root in reason
    _loads_ok(writer, keys)
    # a store opened on a read-only directory serves loads from the start
    reader = make_store(path=writer.root)
    assert reader.stats().blocks == 5
    _loads_ok(reader, keys)
    assert reader.dump(fresh[:1], [payload_for(fresh[0])], LAYOUT).wait(10) == [False]
    assert reader.stats().read_only_reason is not None


_CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from store_helpers import LAYOUT, SALT, payload_for
from ucm.store import FileStore
store = FileStore(sys.argv[1], salt=SALT)
keys = [bytes.fromhex(k) for k in sys.argv[3].split(",")]
out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in keys]
loaded = store.load(keys, out, LAYOUT).wait(10)
exact = all(np.array_equal(o, payload_for(k)) for o, k in zip(out, keys))
new = [bytes(range(20, 40))]
dumped = store.dump(new, [payload_for(new[0])], LAYOUT).wait(10)
print(json.dumps({"loaded": loaded, "exact": exact, "dumped": dumped,
                  "reason": store.stats().read_only_reason}))
"""


def test_permission_denied(make_store: MakeStore) -> None:
    """EACCES as root: a child without CAP_DAC_OVERRIDE on a directory owned by someone else."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE (root bypasses permissions)")
    writer = make_store()
    keys = random_keys(3)
    writer.dump(keys, [payload_for(k) for k in keys], LAYOUT).wait(10)
    for dirpath, _, _ in os.walk(writer.root):
        os.chown(dirpath, 65534, 65534)
        os.chmod(dirpath, 0o755)
    caps = "-dac_override,-dac_read_search"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [
            "setpriv",
            f"--inh-caps={caps}",
            f"--bounding-set={caps}",
            "--",
            sys.executable,
            "-c",
            _CHILD,
            writer.root,
            str(pathlib.Path(__file__).parent),
            ",".join(k.hex() for k in keys),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [True, True, True] and result["exact"]
    assert result["dumped"] == [False]
    assert "EACCES" in result["reason"] and writer.root in result["reason"]
    assert "dumps are now refused" in done.stderr  # the one logged error
