"""Many processes on one directory; writers killed with SIGKILL. No wrong or torn block, ever."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import random
import subprocess
import sys
import time

import numpy as np
import pytest
from store_helpers import LAYOUT, SALT, forked, kill_and_reap, payload_for, random_keys

from ucm.store import BlockLayout, FileStore
from ucm.store.maintenance import collect_garbage
from ucm.store.scan import scan_objects

REPO = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent

_WORKER = """
import json, random, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from store_helpers import LAYOUT, SALT, payload_for
from ucm.store import FileStore

path, role, seed, capacity = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
keys = [bytes([i]) * 4 + i.to_bytes(16, "big") for i in range(64)]  # shared by every process
rng = random.Random(seed)
store = FileStore(path, salt=SALT, io_threads=4, capacity_bytes=capacity or None, touch_interval_s=0.05)
loaded = wrong = dumped = 0
deadline = time.monotonic() + 2.0
while time.monotonic() < deadline:
    batch = rng.sample(keys, 8)
    if role == "writer":
        dumped += sum(store.dump(batch, [payload_for(k) for k in batch], LAYOUT).wait(30))
    out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in batch]
    for key, buf, ok in zip(batch, out, store.load(batch, out, LAYOUT).wait(30)):
        if ok:
            loaded += 1
            wrong += not np.array_equal(buf, payload_for(key))
print(json.dumps({"loaded": loaded, "wrong": wrong, "dumped": dumped, "stats": store.stats().as_dict()}))
"""


@pytest.mark.parametrize("capacity_objects", [0, 40])
def test_many_writer_and_reader_processes(tmp_path: pathlib.Path, capacity_objects: int) -> None:
    path = tmp_path / "shared"
    capacity = capacity_objects * (4096 + LAYOUT.nbytes)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    roles = ["writer", "writer", "writer", "reader", "reader"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(HERE), str(path), role, str(i), str(capacity)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i, role in enumerate(roles)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["wrong"] for r in reports) == 0
    assert all(r["stats"]["corrupt"] == 0 for r in reports)
    assert sum(r["loaded"] for r in reports if r["dumped"] == 0) > 0  # readers saw writers' blocks
    assert sum(r["dumped"] for r in reports) > 0
    objects, temps = scan_objects(str(path / "objects"))
    assert not temps  # no killed writer here: every temp file was published or removed
    if capacity_objects:
        # each process enforces the bound at its own scans; with 3 writers in flight at once the
        # directory may exceed it by the blocks they wrote since, never by more
        assert sum(o.size for o in objects) <= capacity + 3 * 4 * (4096 + LAYOUT.nbytes)
        assert sum(r["stats"]["evictions"] for r in reports) > 0
    # everything that is published is complete and exact, seen from a fresh process
    store = FileStore(path, salt=SALT)
    store.index_ready.wait(10)
    keys = [o.key for o in objects]
    out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in keys]
    assert store.load(keys, out, LAYOUT).wait(30) == [True] * len(keys)
    assert all(np.array_equal(o, payload_for(k)) for o, k in zip(out, keys, strict=True))
    store.close()


BIG = BlockLayout("uint8", (1 << 20,), 1)  # 1 MiB objects: a kill often lands mid-write
_BASE = np.random.default_rng(7).integers(0, 256, BIG.nbytes, dtype=np.uint8)


def _big_payload(key: bytes) -> np.ndarray:
    """Cheap to make (a kill should land in I/O, not in payload generation), unique per key."""
    payload = _BASE.copy()
    payload[: len(key)] = np.frombuffer(key, np.uint8)
    payload[-len(key) :] = np.frombuffer(key, np.uint8)
    return payload


def _killed_writer(path: pathlib.Path, seed: int) -> None:
    """Runs in a forked child: dump fresh keys forever until SIGKILLed."""
    rng = random.Random(seed)
    store = FileStore(path, salt=SALT, io_threads=2)
    while True:
        keys = [rng.randbytes(20) for _ in range(4)]
        store.dump(keys, [_big_payload(k) for k in keys], BIG).wait()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_writer_killed_hundreds_of_times_never_leaves_a_torn_block(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "killed"
    FileStore(path, salt=SALT).close()
    rng = random.Random(1234)
    kills = 0
    for i in range(220):
        pid = forked(functools.partial(_killed_writer, path, i))
        time.sleep(rng.uniform(0.002, 0.03))
        kills += kill_and_reap(pid)
    assert kills >= 200
    objects, temps = scan_objects(str(path / "objects"))
    assert objects, "no writer ever published: the kills came too early to test anything"
    store = FileStore(path, salt=SALT)
    store.index_ready.wait(10)
    keys = [o.key for o in objects]
    out = [np.zeros(BIG.nbytes, np.uint8) for _ in keys]
    results = store.load(keys, out, BIG).wait(60)
    assert results == [True] * len(keys)
    assert all(np.array_equal(o, _big_payload(k)) for o, k in zip(out, keys, strict=True))
    assert store.stats().corrupt == 0
    store.close()
    # killed writers leave temp files only; gc removes them by age
    gc = collect_garbage(str(path), None, temp_max_age_s=0)
    assert gc.temps_removed == len(temps)
    assert not scan_objects(str(path / "objects"))[1]
    print(f"{kills} kills, {len(objects)} published objects all intact, {len(temps)} temp files collected")


def test_concurrent_dumps_of_the_same_key_in_one_process(tmp_path: pathlib.Path) -> None:
    store = FileStore(tmp_path / "s", salt=SALT, io_threads=8)
    key = random_keys(1)[0]
    results = store.dump([key] * 16, [payload_for(key)] * 16, LAYOUT).wait(30)
    assert results == [True] * 16
    stats = store.stats()
    assert stats.dumps == 1 and stats.dump_skipped == 15
    assert len(scan_objects(str(tmp_path / "s" / "objects"))[0]) == 1
    store.close()
