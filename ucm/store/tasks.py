"""`Task` implementations shared by the stores: futures of a thread pool, or results known now."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence

from ucm.store.base import Task


class FutureTask(Task):
    """One future per block; a block's future yields its success flag."""

    def __init__(self, futures: Sequence[concurrent.futures.Future[bool]]) -> None:
        self._futures = list(futures)

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self, timeout: float | None = None) -> list[bool]:
        _, pending = concurrent.futures.wait(self._futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(self._futures)} blocks still in flight")
        # A worker never raises (failures are results), but never let one escape as an exception.
        return [f.exception() is None and bool(f.result()) for f in self._futures]


class DoneTask(Task):
    """Results that are known at submission (e.g. every block refused)."""

    def __init__(self, results: Sequence[bool]) -> None:
        self._results = list(results)

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> list[bool]:
        return list(self._results)


class CombinedTask(Task):
    """Per-block results assembled from parts: each block is either known now or comes from a
    position in an inner task; `finish` runs once when everything is done (e.g. to populate a
    cache with the blocks that loaded)."""

    def __init__(
        self,
        known: Sequence[bool | None],
        inner: Task | None,
        inner_positions: Sequence[int],
        finish: Callable[[list[bool]], None] | None = None,
    ) -> None:
        self._known = list(known)
        self._inner = inner
        self._positions = list(inner_positions)
        self._finish = finish
        self._result: list[bool] | None = None
        self._finish_lock = threading.Lock()

    def done(self) -> bool:
        return self._inner is None or self._inner.done()

    def wait(self, timeout: float | None = None) -> list[bool]:
        if self._result is not None:
            return list(self._result)
        deadline = None if timeout is None else time.monotonic() + timeout
        inner_results: list[bool] = []
        if self._inner is not None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            inner_results = self._inner.wait(remaining)
        with self._finish_lock:
            if self._result is None:
                result = [bool(k) for k in self._known]
                for position, ok in zip(self._positions, inner_results, strict=True):
                    result[position] = ok
                if self._finish is not None:
                    self._finish(result)
                self._result = result
            return list(self._result)
