"""StoreProbe on a real directory: 0 while it answers, growing seconds once it fails or hangs, and
never a second stat while one hangs (a hung NFS mount would otherwise collect blocked threads)."""

from __future__ import annotations

import os
import pathlib
import threading

import pytest

from ucm.connector.store_probe import StoreProbe


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_answers_then_fails_then_answers_again(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    root.mkdir()
    clock = Clock()
    seen: list[float] = []
    probe = StoreProbe(str(root), timeout_s=5, clock=clock)
    probe.listen(seen.append)
    probe.probe_once()
    assert probe.unreachable_seconds() == 0 and probe.reason() is None
    root.rmdir()  # the mount point's directory gone: ENOENT, as a lost export shows
    clock.t += 7
    probe.probe_once()
    clock.t += 3
    assert probe.unreachable_seconds() == 10.0 and probe.reason() is not None and "ENOENT" in probe.reason()
    assert any("unreachable" in r.getMessage() and str(root) in r.getMessage() for r in caplog.records)
    root.mkdir()
    probe.probe_once()
    assert probe.unreachable_seconds() == 0 and probe.reason() is None
    assert seen == [0.0, 7.0, 0.0]


def test_a_hung_stat_counts_after_the_timeout_and_is_not_repeated(tmp_path: pathlib.Path) -> None:
    release = threading.Event()
    calls: list[str] = []
    real_stat = os.stat

    def hanging_stat(path: str) -> os.stat_result:
        calls.append(path)
        release.wait(30)  # what a hard NFS mount does while its server is gone
        return real_stat(path)

    clock = Clock()
    probe = StoreProbe(str(tmp_path), timeout_s=0.05, clock=clock)
    probe._stat = hanging_stat  # only the probe's stat hangs, not every os.stat in the process
    probe.probe_once()  # waits 0.05 s (real time) for the stat, which hangs
    assert probe.unreachable_seconds() == 0  # the fake clock has not passed the timeout yet
    clock.t += 12
    assert probe.unreachable_seconds() == 12.0 and "no answer" in (probe.reason() or "")
    probe.probe_once()
    probe.probe_once()
    assert len(calls) == 1  # still the first stat: no pile-up of blocked threads
    release.set()
    assert probe._pending is not None
    probe._pending.result(10)  # the hung stat returns; the next tick starts a fresh one
    probe.probe_once()
    assert probe.unreachable_seconds() == 0 and len(calls) == 2
    probe.stop()


def test_runs_on_its_own_thread_until_stopped(tmp_path: pathlib.Path) -> None:
    seen = threading.Event()
    probe = StoreProbe(str(tmp_path), interval_s=0.01)
    probe.listen(lambda seconds: seen.set())
    probe.start()
    assert seen.wait(10)
    probe.stop()
    assert probe._thread is not None and not probe._thread.is_alive()
