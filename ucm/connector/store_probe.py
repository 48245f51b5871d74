"""Is the store's volume answering? A background probe for the `vllm:ucm_store_unreachable_seconds`
gauge, run in vLLM's API-server process beside its /metrics endpoint.

Why a probe and not the worker's own counters: the worker reports only with a step's output, and
a step that touches a hung NFS mount (a hard mount blocks, it does not fail) never returns, so its
gauges would keep saying "healthy" for as long as the store is gone. The probe stats the store's
root on its own thread, gives each stat `timeout_s` before it counts as lost, and never starts a
second stat while one hangs (a hung mount would otherwise collect blocked threads). What /metrics
shows is always current: 0 while the last stat succeeded in time, else the seconds since the last
one that did.

Torch- and vLLM-free: a metadata round trip, nothing else.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 10.0


class StoreProbe:
    """Stats `path` every `interval_s`; `unreachable_seconds()` says how long it has not answered.

    Each listener (`listen`) is called with `unreachable_seconds()` after every probe tick, from
    the probe's thread, so a gauge follows it without a scrape-time callback."""

    def __init__(self, path: str, interval_s: float = PROBE_INTERVAL_S, timeout_s: float = PROBE_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._listeners: list[Callable[[float], None]] = []
        self._stat: Callable[[str], object] = os.stat  # one metadata round trip (a test may stand in a hang)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ok = clock()  # a store is presumed reachable until a probe says otherwise
        self._failing: str | None = None  # why the latest probe failed (None: it succeeded)
        self._stat_started: float | None = None  # a stat still outstanding since then
        self._logged: str | None = None
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucm-store-probe-io")
        self._pending: concurrent.futures.Future[None] | None = None
        self._thread: threading.Thread | None = None

    def listen(self, listener: Callable[[float], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def start(self) -> StoreProbe:
        self._thread = threading.Thread(target=self._run, name="ucm-store-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def unreachable_seconds(self) -> float:
        """0 while the store answers; else seconds since it last did (a failed stat, or one
        outstanding for longer than the timeout)."""
        with self._lock:
            now = self._clock()
            hung = self._stat_started is not None and now - self._stat_started > self.timeout_s
            if self._failing is None and not hung:
                return 0.0
            return round(now - self._last_ok, 1)

    def reason(self) -> str | None:
        """Why the store is unreachable (an errno name or "no answer in N s"), None while it answers."""
        with self._lock:
            if self._stat_started is not None and self._clock() - self._stat_started > self.timeout_s:
                return f"no answer from {self.path} in {self.timeout_s:g} s"
            return self._failing

    def probe_once(self) -> None:
        """One tick: start a stat unless one is still outstanding, wait up to the timeout for it."""
        with self._lock:
            if self._pending is not None and not self._pending.done():
                pending = self._pending
            else:
                self._stat_started = self._clock()
                pending = self._pending = self._pool.submit(self._stat, self.path)  # type: ignore[arg-type]
        try:
            pending.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            pass  # still hung: unreachable_seconds() grows from the last success
        except OSError as exc:
            self._record(f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror}")
        else:
            self._record(None)
        self._log_change()
        seconds = self.unreachable_seconds()
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(seconds)

    def _record(self, failure: str | None) -> None:
        with self._lock:
            self._stat_started = None
            self._failing = failure
            if failure is None:
                self._last_ok = self._clock()

    def _log_change(self) -> None:
        reason = self.reason()
        if reason == self._logged:
            return
        if reason is None:
            logger.info("UCM: store %s answers again", self.path)
        else:
            logger.warning("UCM: store %s is unreachable (%s); loads and saves will miss until it answers",
                           self.path, reason)
        self._logged = reason

    def _run(self) -> None:
        while True:
            self.probe_once()
            if self._stop.wait(self.interval_s):
                return
