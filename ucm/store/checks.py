"""Argument checks shared by the stores: keys and caller buffers (programming errors raise
ValueError naming the item; they are never per-block failures)."""

from __future__ import annotations

from collections.abc import Sequence

from ucm.store.base import BlockLayout, Key, WritableBuffer
from ucm.store.format import MAX_KEY_BYTES


def check_keys(keys: Sequence[Key]) -> None:
    # set(map(...)) runs in C: this check stays far below the 5 ms budget for 8,192 keys
    if not keys:
        return
    lengths = set(map(len, keys)) if set(map(type, keys)) == {bytes} else {0}
    if min(lengths) < 16 or max(lengths) > MAX_KEY_BYTES:
        bad = next(k for k in keys if not isinstance(k, bytes) or not 16 <= len(k) <= MAX_KEY_BYTES)
        raise ValueError(f"store keys must be bytes of 16..{MAX_KEY_BYTES} bytes, got {bad!r:.80}")


def check_batch(
    keys: Sequence[Key], buffers: Sequence[WritableBuffer], layout: BlockLayout, *, writable: bool
) -> list[memoryview]:
    check_keys(keys)
    if len(keys) != len(buffers):
        raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
    views = []
    for i, buf in enumerate(buffers):
        try:
            view = memoryview(buf).cast("B")  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError(f"buffer {i} must be a C-contiguous buffer: {exc}") from exc
        if view.nbytes != layout.nbytes:
            raise ValueError(
                f"buffer {i} has {view.nbytes} bytes; layout {layout.describe()} needs {layout.nbytes}"
            )
        if writable and view.readonly:
            raise ValueError(f"buffer {i} is read-only; load needs writable buffers")
        views.append(view)
    return views
