"""`Task` implementations shared by the stores: futures of a thread pool, or results known now."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ucm.store.base import Task


class FutureTask(Task):
    """One future per block; a block's future yields its success flag, or a second future
    that does (a read whose checksum is verified on another thread)."""

    def __init__(
        self, futures: Sequence[concurrent.futures.Future[bool | concurrent.futures.Future[bool]]]
    ) -> None:
        self._futures = list(futures)

    @staticmethod
    def _inner(f: concurrent.futures.Future[Any]) -> concurrent.futures.Future[Any] | None:
        if f.exception() is not None:
            return None
        result = f.result()
        return result if isinstance(result, concurrent.futures.Future) else None

    def done(self) -> bool:
        for f in self._futures:
            if not f.done():
                return False
            inner = self._inner(f)
            if inner is not None and not inner.done():
                return False
        return True

    def wait(self, timeout: float | None = None) -> list[bool]:
        deadline = None if timeout is None else time.monotonic() + timeout
        _, pending = concurrent.futures.wait(self._futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(self._futures)} blocks still in flight")
        inner = [self._inner(f) for f in self._futures]
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        _, pending = concurrent.futures.wait([i for i in inner if i is not None], timeout=remaining)
        if pending:
            raise TimeoutError(f"{len(pending)} of {len(self._futures)} blocks still being verified")
        # A worker never raises (failures are results), but never let one escape as an exception.
        results = []
        for f, i in zip(self._futures, inner, strict=True):
            source = i if i is not None else f
            results.append(source.exception() is None and source.result() is True)
        return results


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
