"""Run a coroutine on uvloop when it is installed (it ships with vLLM), else on asyncio's loop.

The router and its benchmark processes spend most of their CPU in the event loop; uvloop
roughly halves that cost, and nothing depends on it being present."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
