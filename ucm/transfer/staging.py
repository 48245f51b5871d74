"""Moving a batch of blocks between a paged KV cache and host staging memory, layer by layer.

A save batch gathers each layer as soon as the model has written it (`SaveBatch.save_layer`, called
from vLLM's `save_kv_layer`), so on CUDA the device-to-host copy of layer i runs on a side stream
while layer i+1 computes. A load batch is the reverse: host payloads (already read from the store)
are copied to the device and scattered layer by layer, and `LoadBatch.wait_layer(i)` only makes the
compute stream wait for layer i, so later layers keep loading while earlier ones compute.

Host memory holds, per head group, one contiguous block-major tensor ``[n, layers, heads, N, S, D]``;
block i's bytes are one contiguous run, which is what the store writes. Because a layer of many
blocks is not contiguous in that order, a layer-wise save first lands in a layer-major staging
tensor (one contiguous DMA per layer) and is repacked on the host once per batch (`finish`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from ucm.store.base import WritableBuffer
from ucm.transfer.buffers import HostBufferPool
from ucm.transfer.paged import PagedKV, gather_blocks, gather_layer, scatter_layer


@dataclass(frozen=True)
class HeadGroup:
    """KV heads [start, start+count) of this worker's local cache, stored as one object per block."""

    start: int
    count: int


class HostPayload:
    """Block-major host payloads of one head group: `tensor[i]` is block i's canonical payload."""

    def __init__(self, pool: HostBufferPool, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.pool = pool
        per_block = dtype.itemsize
        for d in shape:
            per_block *= d
        self.raw = pool.acquire(n * per_block)
        self.tensor = self.raw.view(dtype).view(n, *shape)
        self._bytes = self.raw.view(n, per_block)

    def block_buffers(self) -> list[WritableBuffer]:
        """One writable byte buffer per block (views, no copy) for `Store.load`/`Store.dump`."""
        flat = self._bytes.numpy()
        return [cast(WritableBuffer, flat[i]) for i in range(flat.shape[0])]

    def release(self) -> None:
        self.pool.release(self.raw)


class _Streams:
    """The side stream and events of one batch (no-ops on CPU, where copies are synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]

    def start_after_compute(self) -> None:
        """Order the side stream after everything the compute stream has issued so far."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))

    def record(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self.stream)
        return event


class SaveBatch:
    """Save `block_ids` of a paged cache into block-major host payloads, one per head group."""

    def __init__(
        self,
        paged: PagedKV,
        block_ids: Sequence[int],
        groups: Sequence[HeadGroup],
        pool: HostBufferPool,
        *,
        layerwise: bool = True,
        staged: bool | None = None,
    ) -> None:
        self.paged = paged
        self.groups = list(groups)
        self.n = len(block_ids)
        # Copy each layer as it is produced (into layer-major staging, repacked in `finish`): on by
        # default on CUDA, where the copy overlaps later layers' compute; on CPU it would overlap
        # nothing, so `finish` gathers every layer in one pass instead (tests can force it on).
        self.staged = (paged.device.type == "cuda") if staged is None else staged
        self.ids = torch.tensor(list(block_ids), dtype=torch.long, device=paged.device)
        self.pool = pool
        self.layerwise = layerwise
        self.head_start = min(g.start for g in self.groups)
        self.head_count = max(g.start + g.count for g in self.groups) - self.head_start
        self._streams = _Streams(paged.device)
        self._stage_raw: torch.Tensor | None = None
        self._stage: torch.Tensor | None = None  # [L, n, heads, N, S, D] layer-major
        self._done_layers: set[int] = set()
        self._events: list[torch.cuda.Event] = []
        self._keep: list[torch.Tensor] = []  # device temporaries alive until the copies finish

    def _stage_tensor(self) -> torch.Tensor:
        if self._stage is None:
            p = self.paged
            shape = (p.num_layers, self.n, self.head_count, p.block_size, p.num_states, p.head_size)
            nbytes = p.dtype.itemsize * int(np.prod(shape))
            self._stage_raw = self.pool.acquire(nbytes)
            self._stage = self._stage_raw.view(p.dtype).view(shape)
        return self._stage

    def save_layer(self, layer: int) -> None:
        """Start copying one layer of the batch to host (asynchronously on CUDA)."""
        if layer in self._done_layers or self.n == 0:
            return
        if not self.staged:
            self._done_layers.add(layer)  # gathered in `finish`
            return
        stage = self._stage_tensor()
        if self._streams.stream is None:
            gather_layer(self.paged, layer, self.ids, self.head_start, self.head_count, out=stage[layer])
            self._done_layers.add(layer)
            return
        self._streams.start_after_compute()
        with torch.cuda.stream(self._streams.stream):
            tmp = torch.empty(stage.shape[1:], dtype=stage.dtype, device=self.paged.device)
            gather_layer(self.paged, layer, self.ids, self.head_start, self.head_count, out=tmp)
            stage[layer].copy_(tmp, non_blocking=True)
            self._keep.append(tmp)
        event = self._streams.record()
        assert event is not None
        self._events.append(event)
        self._done_layers.add(layer)

    def finish(self) -> list[HostPayload]:
        """Wait for the copies and return one block-major payload per head group (caller releases)."""
        p = self.paged
        payloads: list[HostPayload] = []
        try:
            for g in self.groups:
                payloads.append(HostPayload(self.pool, self.n, p.payload_shape(g.count), p.dtype))
        except BaseException:
            for payload in payloads:
                payload.release()
            raise
        if self.n == 0:
            return payloads
        if not self.staged or (not self._done_layers and not self.layerwise):
            self._gather_all(payloads)
            return payloads
        for layer in range(p.num_layers):
            self.save_layer(layer)
        for event in self._events:
            event.synchronize()
        self._keep.clear()
        stage = self._stage_tensor()
        for g, payload in zip(self.groups, payloads, strict=True):
            part = stage.narrow(2, g.start - self.head_start, g.count)
            payload.tensor.copy_(part.transpose(0, 1))
        assert self._stage_raw is not None
        self.pool.release(self._stage_raw)
        self._stage_raw = self._stage = None
        return payloads

    def _gather_all(self, payloads: list[HostPayload]) -> None:
        """All layers at once, straight into the block-major payloads (no layer-major staging)."""
        for g, payload in zip(self.groups, payloads, strict=True):
            if self._streams.stream is None:
                gather_blocks(self.paged, self.ids, g.start, g.count, out=payload.tensor)
                continue
            self._streams.start_after_compute()
            with torch.cuda.stream(self._streams.stream):
                tmp = torch.empty_like(payload.tensor, device=self.paged.device)
                gather_blocks(self.paged, self.ids, g.start, g.count, out=tmp)
                payload.tensor.copy_(tmp, non_blocking=True)
            self._streams.stream.synchronize()

    def abandon(self) -> None:
        """Release staging memory without producing payloads (e.g. the step failed)."""
        for event in self._events:
            event.synchronize()
        if self._stage_raw is not None:
            self.pool.release(self._stage_raw)
            self._stage_raw = self._stage = None


class LoadBatch:
    """Scatter block-major host payloads (one per head group) into `block_ids` of a paged cache."""

    def __init__(
        self,
        paged: PagedKV,
        block_ids: Sequence[int],
        groups: Sequence[HeadGroup],
        payloads: Sequence[torch.Tensor],
    ) -> None:
        self.paged = paged
        self.groups = list(groups)
        self.payloads = list(payloads)
        self.ids = torch.tensor(list(block_ids), dtype=torch.long, device=paged.device)
        self._streams = _Streams(paged.device)
        self._events: dict[int, torch.cuda.Event] = {}
        self._device_payloads: list[torch.Tensor] = []
        self._done: set[int] = set()

    def start(self) -> None:
        """On CUDA, enqueue every layer's copy on the side stream now (events per layer)."""
        if self._streams.stream is None or len(self.ids) == 0:
            return
        self._streams.start_after_compute()
        with torch.cuda.stream(self._streams.stream):
            self._device_payloads = [t.to(self.paged.device, non_blocking=True) for t in self.payloads]
            for layer in range(self.paged.num_layers):
                for g, dev in zip(self.groups, self._device_payloads, strict=True):
                    scatter_layer(self.paged, layer, self.ids, g.start, g.count, dev[:, layer])
                event = self._streams.record()
                assert event is not None
                self._events[layer] = event

    def wait_layer(self, layer: int) -> None:
        """Make layer `layer` valid for the compute that follows (CPU: do the copy now)."""
        if layer in self._done or len(self.ids) == 0:
            return
        if self._streams.stream is None:
            for g, src in zip(self.groups, self.payloads, strict=True):
                scatter_layer(self.paged, layer, self.ids, g.start, g.count, src[:, layer])
        else:
            if layer not in self._events:
                self.start()
            torch.cuda.current_stream(self.paged.device).wait_event(self._events[layer])
        self._done.add(layer)

    def finish(self) -> None:
        """Every layer loaded (for layers whose attention never asked) and host memory reusable."""
        for layer in range(self.paged.num_layers):
            self.wait_layer(layer)
        for event in self._events.values():
            event.synchronize()
        self._device_payloads.clear()
