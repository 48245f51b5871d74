"""runtime.WorkQueue: one pass per cluster at a time, events coalesced, none lost."""

from __future__ import annotations

import asyncio

from ucm_operator.runtime import WorkQueue


async def test_coalesces_and_requeues_keys_added_while_processing() -> None:
    queue = WorkQueue()
    a, b = ("ns", "a"), ("ns", "b")
    for _ in range(5):
        queue.add(a)
    queue.add(b)
    assert await queue.get() == a
    queue.add(a)  # changed while being processed: must run once more, but not concurrently
    assert await queue.get() == b
    queue.done(b)
    assert queue._queue.empty()  # a is not handed out while still processing
    queue.done(a)
    assert await asyncio.wait_for(queue.get(), 1) == a
    queue.done(a)
    assert queue.idle


async def test_add_after() -> None:
    queue = WorkQueue()
    queue.add_after(("ns", "x"), 0.05)
    assert queue.idle
    assert await asyncio.wait_for(queue.get(), 1) == ("ns", "x")
