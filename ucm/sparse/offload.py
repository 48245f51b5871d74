"""Offload of unselected KV blocks to the store, with a bounded set of device-resident blocks.

Why: sparse attention reads only the selected blocks, so the rest need not occupy GPU memory at
all. Each (layer, block, KV head) is one store object (key = `block_key(layer_block_hash, head, 1)`,
payload = that head's K and V of the block, [2, block_size, head_dim]); per-head objects match the
per-KV-head selection, so a fetch moves exactly the bytes the selection needs.

`ResidentBlocks` owns a fixed pool of device slots (the resident budget). A decode step calls
`ensure(selected)`: selected (head, block) pairs that are not resident are loaded from the store
into free slots, evicting the least recently used non-pinned ones; the current selection and the
always-kept windows are pinned, so the pool can never evict what this step attends to. `prefetch`
starts store loads for blocks predicted to be selected next (the caller predicts: the previous
selection plus the runners-up of the last scoring) so their fetch overlaps the current step.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import xxhash

from ucm.hashing import HASH_BYTES, block_key
from ucm.store.base import BlockLayout, Store, Task

Pair = tuple[int, int]  # (kv head, logical block index)


class OffloadError(RuntimeError):
    """The resident budget cannot hold what a step must attend to, or a selected block is missing."""


@dataclasses.dataclass
class OffloadStats:
    """Counters since creation; `fetched_*` are demand loads on the critical path of a step."""

    steps: int = 0
    fetched_blocks: int = 0
    fetched_bytes: int = 0
    prefetched_blocks: int = 0
    prefetched_bytes: int = 0
    prefetch_hits: int = 0  # selected blocks that a prefetch had already brought in
    evictions: int = 0
    dumped_blocks: int = 0


def layer_block_hash(block_hash: bytes, layer_index: int) -> bytes:
    """16-byte hash naming one block's KV in one layer (the store keys one layer's object per head)."""
    return xxhash.xxh3_128_digest(block_hash + layer_index.to_bytes(4, "little"))[:HASH_BYTES]


def head_block_layout(block_size: int, head_dim: int, dtype: torch.dtype) -> BlockLayout:
    """Layout of one (block, head) object: K and V stacked, [2, block_size, head_dim]."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return BlockLayout(str(dtype).removeprefix("torch."), (2, block_size, head_dim), itemsize)


def bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, for the store's buffer protocol (works for bf16)."""
    array: Any = t.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


class ResidentBlocks:
    """Device-resident (head, block) KV slots of one request's layer, backed by a store."""

    def __init__(
        self,
        store: Store,
        block_hashes: Sequence[bytes],
        *,
        layer_index: int,
        num_kv_heads: int,
        block_size: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 1:
            raise OffloadError(f"resident_blocks: expected >= 1 slot, got {capacity}")
        self.store = store
        self.keys_by_block = [layer_block_hash(h, layer_index) for h in block_hashes]
        self.num_kv_heads = num_kv_heads
        self.layout = head_block_layout(block_size, head_dim, dtype)
        self.capacity = capacity
        self.device = torch.device(device)
        # one slot = K and V of one (head, block): [2, bs, D]
        self.slots = torch.zeros(capacity, 2, block_size, head_dim, dtype=dtype, device=self.device)
        self._staging = (
            torch.zeros(capacity, 2, block_size, head_dim, dtype=dtype, pin_memory=torch.cuda.is_available())
            if self.device.type != "cpu"
            else self.slots
        )
        self.slot_of: collections.OrderedDict[Pair, int] = collections.OrderedDict()  # LRU order
        self.free = list(range(capacity - 1, -1, -1))
        self.pinned: set[Pair] = set()
        self._pending: dict[Pair, tuple[int, Task, int]] = {}  # pair -> (slot, task, index in task)
        self.stats = OffloadStats()

    # ------------------------------------------------------------------ keys and dumps
    def key(self, pair: Pair) -> bytes:
        head, block = pair
        if not 0 <= block < len(self.keys_by_block):
            raise OffloadError(f"block {block} is outside the request's {len(self.keys_by_block)} blocks")
        return block_key(self.keys_by_block[block], head, 1)

    def add_blocks(self, block_hashes: Iterable[bytes], layer_index: int) -> None:
        """The sequence grew by full blocks: extend the key list (their KV is dumped by `offload`)."""
        self.keys_by_block.extend(layer_block_hash(h, layer_index) for h in block_hashes)

    def offload(self, block: int, kv: torch.Tensor) -> Task:
        """Write block `block`'s KV [2, H, bs, D] to the store, one object per head (wait on the task
        before reusing `kv`). Writing is what makes the block evictable from the device."""
        payload = kv.detach().to("cpu").transpose(0, 1).contiguous()  # [H, 2, bs, D]
        keys = [self.key((h, block)) for h in range(self.num_kv_heads)]
        self.stats.dumped_blocks += len(keys)
        return self.store.dump(keys, [bytes_view(payload[h]) for h in range(self.num_kv_heads)], self.layout)

    # ------------------------------------------------------------------ residency
    def is_resident(self, pair: Pair) -> bool:
        return pair in self.slot_of

    def resident_pairs(self) -> list[Pair]:
        return list(self.slot_of)

    def install(self, pair: Pair, kv: torch.Tensor) -> None:
        """Place KV [2, bs, D] already on hand (e.g. a freshly written local block) into a slot."""
        slot = self._take_slot()
        self.slots[slot].copy_(kv)
        self.slot_of[pair] = slot

    def _take_slot(self) -> int:
        if self.free:
            return self.free.pop()
        for pair in self.slot_of:  # oldest first
            if pair not in self.pinned:
                self.stats.evictions += 1
                return self.slot_of.pop(pair)
        raise OffloadError(
            f"resident_blocks: all {self.capacity} slots are pinned by the current selection; "
            "the budget must be at least (kept blocks per head) x (KV heads)"
        )

    def _start_loads(self, pairs: Sequence[Pair]) -> tuple[Task, list[int]]:
        slots = [self._take_slot() for _ in pairs]
        buffers = [bytes_view(self._staging[s]) for s in slots]
        task = self.store.load([self.key(p) for p in pairs], buffers, self.layout)
        return task, slots

    def prefetch(self, pairs: Iterable[Pair]) -> int:
        """Start loads for predicted pairs that are neither resident nor pending, as far as free or
        evictable (unpinned) slots allow without evicting anything pinned; returns how many."""
        wanted = [p for p in dict.fromkeys(pairs) if p not in self.slot_of and p not in self._pending]
        room = len(self.free) + sum(1 for p in self.slot_of if p not in self.pinned)
        wanted = wanted[:room]
        if not wanted:
            return 0
        task, slots = self._start_loads(wanted)
        for i, (pair, slot) in enumerate(zip(wanted, slots, strict=True)):
            self._pending[pair] = (slot, task, i)
        self.stats.prefetched_blocks += len(wanted)
        self.stats.prefetched_bytes += len(wanted) * self.layout.nbytes
        return len(wanted)

    def _finish_pending(self, pair: Pair) -> bool:
        slot, task, index = self._pending.pop(pair)
        ok = task.wait()[index]
        if ok:
            if self._staging is not self.slots:
                self.slots[slot].copy_(self._staging[slot], non_blocking=True)
            self.slot_of[pair] = slot
        else:
            self.free.append(slot)
        return ok

    def ensure(self, selected: torch.Tensor) -> list[Pair]:
        """Make every (head, block) of `selected` [H, K] resident and pin exactly those; returns the
        pairs that were demand-fetched from the store for this step."""
        self.stats.steps += 1
        wanted: list[Pair] = [(h, b) for h, row in enumerate(selected.tolist()) for b in row]
        self.pinned = set(wanted)
        for pair in wanted:
            if pair in self._pending and self._finish_pending(pair):
                self.stats.prefetch_hits += 1
        missing = [p for p in wanted if p not in self.slot_of]
        if missing:
            task, slots = self._start_loads(missing)
            results = task.wait()
            for pair, slot, ok in zip(missing, slots, results, strict=True):
                if not ok:
                    self.free.append(slot)
                    raise OffloadError(f"block {pair[1]} head {pair[0]}: selected but missing from the store")
                if self._staging is not self.slots:
                    self.slots[slot].copy_(self._staging[slot], non_blocking=True)
                self.slot_of[pair] = slot
            self.stats.fetched_blocks += len(missing)
            self.stats.fetched_bytes += len(missing) * self.layout.nbytes
        for pair in wanted:  # most recently used last
            self.slot_of.move_to_end(pair)
        return missing

    def gather(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [H, K, bs, D] of the (resident) selection, in selection order."""
        heads, k = selected.shape
        index = torch.tensor(
            [self.slot_of[(h, int(b))] for h in range(heads) for b in selected[h].tolist()],
            dtype=torch.long,
            device=self.device,
        )
        kv = self.slots.index_select(0, index).view(heads, k, *self.slots.shape[1:])
        return kv[:, :, 0], kv[:, :, 1]

    def drain(self) -> None:
        """Wait for every prefetch in flight (call before dropping the object)."""
        for pair in list(self._pending):
            self._finish_pending(pair)
