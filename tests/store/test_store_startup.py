"""Opening a brand-new store directory from many processes at the same instant.

Workers of a new pool start together, so the first-time creation of the marker races. Every
opener must succeed and see the same store; none may mistake another opener's temp file or
freshly published marker for a foreign directory (the old check-then-list did, about once in
120 openers). The multi-process tests release all openers at one instant with a Barrier; the
jittered one adds random sleeps inside the opening's file operations so that the interleavings
that matter happen in every round instead of once in a while (with the old code 19 of 20
rounds failed). The single-process tests replay the two dangerous interleavings exactly.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from store_helpers import LAYOUT, SALT, payload_for

from ucm.store import FileStore, StoreError
from ucm.store.format import (
    MARKER_FORMAT,
    MARKER_NAME,
    MARKER_VERSION,
    OBJECTS_DIR,
    QUARANTINE_DIR,
    temp_name,
)
from ucm.store.root import prepare_root

OPENERS = 24
EXPECTED_MARKER = {"format": MARKER_FORMAT, "version": MARKER_VERSION}
_FORK = multiprocessing.get_context("fork")  # children inherit the imports: starting 24 is cheap


def _opener_key(i: int) -> bytes:
    return b"opener-key-" + i.to_bytes(9, "big")


def _with_jitter(fn: Callable[..., Any], rng: random.Random) -> Callable[..., Any]:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(rng.uniform(0, 0.002))
        return fn(*args, **kwargs)

    return slow


def _add_jitter(seed: int) -> None:
    """Only ever called in a forked child: slows the steps between which another opener can
    publish the marker (patching `os` there affects no other process)."""
    rng = random.Random(seed)
    for name in ("listdir", "link", "rename", "fsync"):
        setattr(os, name, _with_jitter(getattr(os, name), rng))


def _open_when_released(path: str, i: int, barrier: Any, results: Any, jitter: bool) -> None:
    """Child: wait for the others, open the store, dump a block of its own, report the marker."""
    try:
        if jitter:
            _add_jitter(i)
        barrier.wait(timeout=60)
        store = FileStore(path, salt=SALT, io_threads=1, prepare_shards=False)
        try:
            dumped = store.dump([_opener_key(i)], [payload_for(_opener_key(i))], LAYOUT).wait(30)
        finally:
            store.close()
        with open(os.path.join(path, MARKER_NAME), encoding="utf-8") as f:
            results.put((i, "ok" if dumped == [True] else f"dump failed: {dumped}", json.load(f)))
    except BaseException as exc:  # report everything: the parent asserts on it
        results.put((i, repr(exc), None))


def _open_together(path: pathlib.Path, jitter: bool) -> None:
    barrier = _FORK.Barrier(OPENERS)
    results = _FORK.Queue()
    procs = [
        _FORK.Process(target=_open_when_released, args=(str(path), i, barrier, results, jitter))
        for i in range(OPENERS)
    ]
    for proc in procs:
        proc.start()
    reports = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    failures = [r for r in reports if r[1] != "ok"]
    assert not failures, f"{len(failures)} of {OPENERS} openers failed in {path}: {failures[:3]}"
    assert all(marker == EXPECTED_MARKER for _, _, marker in reports)  # one store identity
    # nothing of the openers' is left behind: no temp marker, nothing a later opener could
    # take for a foreign file
    assert sorted(os.listdir(path)) == sorted([MARKER_NAME, OBJECTS_DIR, QUARANTINE_DIR])


def _every_opener_wrote_to_one_store(path: pathlib.Path) -> None:
    store = FileStore(path, salt=SALT, io_threads=2, prepare_shards=False)
    try:
        keys = [_opener_key(i) for i in range(OPENERS)]
        out = [np.zeros(LAYOUT.nbytes, np.uint8) for _ in keys]
        assert store.load(keys, out, LAYOUT).wait(30) == [True] * OPENERS
        assert all(np.array_equal(o, payload_for(k)) for o, k in zip(out, keys, strict=True))
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize(("jitter", "rounds"), [(False, 12), (True, 12)], ids=["released", "jittered"])
def test_many_processes_create_a_new_store_at_once(tmp_path: pathlib.Path, jitter: bool, rounds: int) -> None:
    for r in range(rounds):
        path = tmp_path / f"new-{r}"  # does not exist yet: the openers race to create it
        _open_together(path, jitter)
        if r == 0:
            _every_opener_wrote_to_one_store(path)


# -- the interleavings, replayed in one process -----------------------------------------------


def _publish_marker_as_another_opener(root: pathlib.Path, meta: object = EXPECTED_MARKER) -> None:
    tmp = root / temp_name("marker")
    tmp.write_text(json.dumps(meta))
    os.link(tmp, root / MARKER_NAME)
    tmp.unlink()


def _before_first_listing(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    real = os.listdir
    done: list[bool] = []

    def listdir(path: str) -> list[str]:
        if not done:
            done.append(True)
            action()
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)


def test_marker_published_between_check_and_listing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported race: our marker check finds none, another opener publishes one, our
    listing shows it. That is a store being created, not a foreign directory."""
    root = tmp_path / "s"
    root.mkdir()
    _before_first_listing(monkeypatch, lambda: _publish_marker_as_another_opener(root))
    assert prepare_root(str(root), direct=False) is None
    assert json.loads((root / MARKER_NAME).read_text()) == EXPECTED_MARKER


def test_other_openers_temp_marker_is_not_foreign(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "s"
    root.mkdir()
    other_tmp = root / temp_name("marker")  # another opener, mid-write (or killed there)
    _before_first_listing(monkeypatch, lambda: other_tmp.write_text('{"form'))
    assert prepare_root(str(root), direct=False) is None
    assert json.loads((root / MARKER_NAME).read_text()) == EXPECTED_MARKER


@pytest.mark.parametrize(
    ("winner", "error"),
    [(EXPECTED_MARKER, None), ({"format": MARKER_FORMAT, "version": 99}, "version 99")],
    ids=["same-version", "other-version"],
)
def test_lost_publish_race_reads_the_winners_marker(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, winner: dict[str, object], error: str | None
) -> None:
    """Another opener publishes after our listing but before our link: we lose, and go by
    what the winner wrote. A winner of another layout version is refused, not ignored."""
    root = tmp_path / "s"
    root.mkdir()
    real = os.listdir

    def listdir(path: str) -> list[str]:
        names = real(path)
        if MARKER_NAME not in names:
            _publish_marker_as_another_opener(root, winner)
        return names  # the listing from before the winner published

    monkeypatch.setattr(os, "listdir", listdir)
    if error is None:
        assert prepare_root(str(root), direct=False) is None
    else:
        with pytest.raises(StoreError, match=error):
            prepare_root(str(root), direct=False)
    monkeypatch.undo()
    assert json.loads((root / MARKER_NAME).read_text()) == winner
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]  # our temp file is gone


def test_foreign_directory_is_still_refused(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "home"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / temp_name("marker")).write_text("")  # an opener's temp file does not make it ours
    with pytest.raises(StoreError, match="foreign directory"):
        prepare_root(str(root), direct=False)
    assert not (root / MARKER_NAME).exists()
