"""A bounded pool of host staging buffers, page-locked when CUDA is present.

Pinned memory is what lets a device<->host copy run asynchronously on a side stream at full PCIe
speed, but pinning is slow (a syscall and page-table work per allocation) and pinned pages are
taken away from the OS, so buffers are allocated once, reused, and capped by `capacity_bytes`:
when every byte is in use, `acquire` waits for a release instead of growing without bound (the
"host buffer sizing" failure users of KV offloading report).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import torch

_GRANULE = 1 << 16  # sizes are rounded up to 64 KiB so buffers are reusable across batch sizes


class PoolExhausted(TimeoutError):
    """No staging buffer became free in time; the message says how the pool is sized."""


class HostBufferPool:
    """Reusable flat `uint8` host tensors, at most `capacity_bytes` allocated at once."""

    def __init__(self, capacity_bytes: int, *, pin: bool | None = None, timeout: float | None = 30.0) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.timeout = timeout  # default wait of `acquire` for a free buffer
        self.pin = torch.cuda.is_available() if pin is None else pin
        if self.pin and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA (page-locked memory is a CUDA driver feature)")
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._allocated = 0
        self._in_use = 0
        self._cond = threading.Condition()

    @property
    def allocated_bytes(self) -> int:
        return self._allocated

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    def acquire(self, nbytes: int, timeout: float | str | None = "default") -> torch.Tensor:
        """A `uint8` tensor of at least `nbytes` bytes (sliced to exactly `nbytes`); waits up to
        `timeout` seconds (the pool's default unless given) for one to be released."""
        if timeout == "default":
            timeout = self.timeout
        assert timeout is None or isinstance(timeout, (int, float))
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        size = -(-nbytes // _GRANULE) * _GRANULE
        if size > self.capacity_bytes:
            raise ValueError(
                f"a staging buffer of {nbytes} bytes exceeds the pool capacity of {self.capacity_bytes} "
                f"bytes; raise the host staging capacity or transfer fewer blocks per batch"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                free = self._free.get(size)
                if free:
                    buf = free.pop()
                    self._in_use += size
                    return buf[:nbytes]
                if self._allocated + size > self.capacity_bytes:
                    self._drop_free_buffers(size)
                if self._allocated + size <= self.capacity_bytes:
                    buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
                    self._allocated += size
                    self._in_use += size
                    return buf[:nbytes]
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolExhausted(
                        f"no host staging buffer of {size} bytes free after {timeout}s "
                        f"({self._in_use} of {self.capacity_bytes} bytes in use)"
                    )
                self._cond.wait(remaining)

    def release(self, buf: torch.Tensor) -> None:
        """Return a buffer obtained from `acquire` (any slice of it)."""
        base = buf if buf._base is None else buf._base
        assert isinstance(base, torch.Tensor)
        size = base.numel()
        with self._cond:
            self._free[size].append(base)
            self._in_use -= size
            self._cond.notify_all()

    def _drop_free_buffers(self, needed: int) -> None:
        """Free cached buffers of other sizes until `needed` more bytes fit (caller holds the lock)."""
        for size in sorted(self._free, reverse=True):
            bucket = self._free[size]
            while bucket and self._allocated + needed > self.capacity_bytes:
                bucket.pop()
                self._allocated -= size
            if self._allocated + needed <= self.capacity_bytes:
                return
