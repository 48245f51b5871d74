"""Polling with a deadline, for e2e tests and the harness.

Kubernetes is eventually consistent: a test states the condition it needs and waits for it, and
on timeout reports what it waited for and the last value or error it saw, which is usually the
whole diagnosis.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time (an AssertionError so pytest reports it as a failure)."""


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.2,
) -> T:
    """Calls `probe` until it returns a truthy value and returns that value. Exceptions raised by
    the probe count as "not yet" (the last one is reported on timeout)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}; last seen: {last!r}")
        time.sleep(interval_s)
