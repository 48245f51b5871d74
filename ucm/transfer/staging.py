"""Moving a batch of blocks between a paged KV cache and host staging memory, layer by layer.

A save batch gathers each layer as soon as the model has written it (`SaveBatch.save_layer`, called
from vLLM's `save_kv_layer`), so on CUDA the device-to-host copy of layer i runs on a side stream
while layer i+1 computes. A load batch is the reverse: host payloads (already read from the store)
are copied to the device and scattered layer by layer, and `LoadBatch.wait_layer(i)` only makes the
compute stream wait for layer i, so later layers keep loading while earlier ones compute.

Host memory holds one `HostPayload` per batch: ``[groups, n, layers, heads_in_group, N, S, D]``,
group-major then block-major, so each (group, block) object is one contiguous run of bytes, which
is what the store reads and writes. Because a layer of many blocks is not contiguous in that
order, a layer-wise save on CUDA first lands in a layer-major staging tensor (one contiguous DMA
per layer) and is repacked on the host once per batch (`finish`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from ucm.transfer.buffers import HostBufferPool
from ucm.transfer.paged import PagedKV, gather_groups, gather_layer, scatter_groups, scatter_groups_layer

if TYPE_CHECKING:  # typing only: the transfer path does not need the store at run time
    from ucm.store.base import WritableBuffer


@dataclass(frozen=True)
class HeadGroup:
    """KV heads [start, start+count) of this worker's local cache, stored as one object per block."""

    start: int
    count: int


def _as_tuples(groups: Sequence[HeadGroup]) -> list[tuple[int, int]]:
    if not groups:
        raise ValueError("at least one head group is needed")
    if len({g.count for g in groups}) != 1:
        raise ValueError(f"head groups must have equal sizes, got {[g.count for g in groups]}")
    return [(g.start, g.count) for g in groups]


class HostPayload:
    """Host payloads of a batch: `tensor[g, i]` is block i's canonical payload for head group g."""

    def __init__(
        self, pool: HostBufferPool, groups: int, n: int, shape: tuple[int, ...], dtype: torch.dtype,
        timeout: float | str | None = "default",
    ) -> None:
        self.pool = pool
        per_block = dtype.itemsize * int(np.prod(shape))
        self.raw = pool.acquire(groups * n * per_block, timeout)
        self.tensor = self.raw.view(dtype).view(groups, n, *shape)
        self._bytes = self.raw.view(groups * n, per_block)

    def block_buffers(self) -> list[WritableBuffer]:
        """One writable byte buffer per (group, block), group-major (views, no copy), for
        `Store.load`/`Store.dump`."""
        flat = self._bytes.numpy()
        return [cast("WritableBuffer", flat[i]) for i in range(flat.shape[0])]

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
    """Save `block_ids` of a paged cache into one `HostPayload` covering every head group."""

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
        self._group_tuples = _as_tuples(self.groups)
        self.n = len(block_ids)
        # Copy each layer as it is produced (into layer-major staging, repacked in `finish`): on by
        # default on CUDA, where the copy overlaps later layers' compute; on CPU it would overlap
        # nothing, so `finish` gathers every layer in one pass instead (tests can force it on).
        self.staged = (paged.device.type == "cuda") if staged is None else staged
        self.ids = torch.tensor(list(block_ids), dtype=torch.long, device=paged.device)
        self.pool = pool
        self.layerwise = layerwise
        self.group_size = self.groups[0].count
        self.head_start = self.groups[0].start
        self.head_count = self.group_size * len(self.groups)
        if [g.start for g in self.groups] != list(range(self.head_start, self.head_start + self.head_count, self.group_size)):
            raise ValueError(f"head groups must be consecutive and in order, got {self.groups}")
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

    def finish(self) -> HostPayload:
        """Wait for the copies and return the batch's host payload (the caller releases it)."""
        p = self.paged
        payload = HostPayload(self.pool, len(self.groups), self.n, p.payload_shape(self.group_size), p.dtype)
        if self.n == 0:
            return payload
        if not self.staged or (not self._done_layers and not self.layerwise):
            self._gather_all(payload)
            return payload
        for layer in range(p.num_layers):
            self.save_layer(layer)
        for event in self._events:
            event.synchronize()
        self._keep.clear()
        stage = self._stage_tensor()
        g, gs = len(self.groups), self.group_size
        by_group = stage.view(p.num_layers, self.n, g, gs, *stage.shape[3:]).permute(2, 1, 0, 3, 4, 5, 6)
        payload.tensor.copy_(by_group)
        assert self._stage_raw is not None
        self.pool.release(self._stage_raw)
        self._stage_raw = self._stage = None
        return payload

    def _gather_all(self, payload: HostPayload) -> None:
        """All layers and groups in one indexing call, straight into the payload (no staging)."""
        if self._streams.stream is None:
            gather_groups(self.paged, self.ids, self._group_tuples, out=payload.tensor)
            return
        self._streams.start_after_compute()
        with torch.cuda.stream(self._streams.stream):
            tmp = torch.empty_like(payload.tensor, device=self.paged.device)
            gather_groups(self.paged, self.ids, self._group_tuples, out=tmp)
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
    """Scatter a host payload ``[groups, n, *payload]`` into `block_ids` of a paged cache."""

    def __init__(
        self, paged: PagedKV, block_ids: Sequence[int], groups: Sequence[HeadGroup], payload: torch.Tensor
    ) -> None:
        self.paged = paged
        self.groups = _as_tuples(groups)
        self.payload = payload
        self.ids = torch.tensor(list(block_ids), dtype=torch.long, device=paged.device)
        self._streams = _Streams(paged.device)
        self._events: dict[int, torch.cuda.Event] = {}
        self._device_payload: torch.Tensor | None = None
        self._all_done = len(self.ids) == 0

    def start(self) -> None:
        """On CUDA, enqueue every layer's copy on the side stream now (events per layer)."""
        if self._streams.stream is None or self._all_done or self._events:
            return
        self._streams.start_after_compute()
        with torch.cuda.stream(self._streams.stream):
            dev = self.payload.to(self.paged.device, non_blocking=True)
            self._device_payload = dev
            for layer in range(self.paged.num_layers):
                scatter_groups_layer(self.paged, layer, self.ids, self.groups, dev[:, :, layer])
                event = self._streams.record()
                assert event is not None
                self._events[layer] = event

    def wait_layer(self, layer: int) -> None:
        """Make layer `layer` valid for the compute that follows.

        On CPU the copy is synchronous and overlaps nothing, so the first call scatters every
        layer in one indexing call; on CUDA only the compute stream waits, for that layer's event.
        """
        if self._all_done:
            return
        if self._streams.stream is None:
            scatter_groups(self.paged, self.ids, self.groups, self.payload)
            self._all_done = True
            return
        self.start()
        torch.cuda.current_stream(self.paged.device).wait_event(self._events[layer])

    def finish(self) -> None:
        """Every layer loaded (for layers whose attention never asked) and host memory reusable."""
        if self._streams.stream is None:
            self.wait_layer(0)
            return
        self.start()
        for event in self._events.values():
            event.synchronize()
        self._device_payload = None
        self._all_done = True
