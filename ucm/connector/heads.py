"""Which KV heads a tensor-parallel rank owns, and how heads are grouped into stored objects.

Pure Python (no torch, no vLLM) so the operator can check at admission time which TP sizes can
share a store (`supported_tp_sizes`), with the same rule the connector applies at start-up.

Head groups. Blocks are stored as one object per block per group of `group_size` consecutive KV
heads, so pools with different TP sizes share them: a rank with h local heads reads and writes
h / group_size objects per block, exactly the heads it owns. `group_size` is the model's KV heads
divided by the largest power of two <= `max_tp_size` (the `max_tp_size` extra-config key, default
8) that divides them (Llama-3-8B: 8 heads -> 1 head per object, TP 1/2/4/8 all share). Smaller
groups mean more, smaller objects (a 16-token block of Llama-3-8B is 8 objects of 256 KiB instead
of one of 2 MiB), and a file store writes small objects about 3x slower, so a cluster whose pools
never exceed TP 2 sets `max_tp_size=2` and gets 4-head objects of 1 MiB. A rank whose TP size
exceeds `max_tp_size` is refused at start-up (its ranks would own parts of a stored group). The
group is part of every key, so a pool that used another group size only misses, never reads wrong
bytes. MLA's latent KV is not split across ranks: rank 0 writes one object per block and every rank
reads it.
"""

from __future__ import annotations

import dataclasses

MAX_SHARED_TP = 8
# Accepted values of `max_tp_size`. The largest (the default) also keeps TP sizes above 8 whose ranks
# hold whole replicated heads or MLA's latent KV, as before the key existed.
MAX_TP_SIZES = (1, 2, 4, 8)


def canonical_group_size(total_kv_heads: int, is_mla: bool, max_tp_size: int = MAX_SHARED_TP) -> int:
    """KV heads per stored object (see the module docstring)."""
    if is_mla:
        return 1
    tp = min(max_tp_size, MAX_SHARED_TP)
    while tp > 1 and total_kv_heads % tp:
        tp //= 2
    return total_kv_heads // tp


def supported_tp_sizes(total_kv_heads: int, is_mla: bool, max_tp_size: int = MAX_SHARED_TP) -> list[int]:
    """TP sizes (up to 64) whose ranks each own whole head groups, none above `max_tp_size` unless it
    is the default 8 (see `MAX_TP_SIZES`)."""
    if max_tp_size not in MAX_TP_SIZES:
        raise ValueError(f"max_tp_size must be one of {list(MAX_TP_SIZES)}, got {max_tp_size!r}")
    limit = 64 if max_tp_size == MAX_SHARED_TP else max_tp_size
    if is_mla:
        return [tp for tp in (1, 2, 4, 8, 16, 32, 64) if tp <= limit]
    group = canonical_group_size(total_kv_heads, is_mla, max_tp_size)
    sizes = [tp for tp in range(1, total_kv_heads + 1) if total_kv_heads % tp == 0 and (total_kv_heads // tp) % group == 0]
    if group == 1:
        sizes += [tp for tp in range(total_kv_heads + 1, 65) if tp % total_kv_heads == 0]  # replicated heads
    return [tp for tp in sizes if tp <= limit]


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """The KV heads of one TP rank and the stored groups they map to."""

    total_heads: int
    group_size: int
    local_start: int  # global index of the rank's first local head
    local_count: int
    writes: bool  # False for ranks holding a replica another rank already writes

    def groups(self) -> list[tuple[int, int, int]]:
        """(global head start, head count, local head offset) of each stored group the rank owns."""
        return [
            (self.local_start + off, self.group_size, off)
            for off in range(0, self.local_count, self.group_size)
        ]


def plan_heads(
    total_kv_heads: int, tp_size: int, tp_rank: int, *, is_mla: bool, max_tp_size: int = MAX_SHARED_TP
) -> HeadPlan:
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    supported = supported_tp_sizes(total_kv_heads, is_mla, max_tp_size)
    if max_tp_size < MAX_SHARED_TP and tp_size > max_tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} exceeds kv_connector_extra_config.max_tp_size={max_tp_size}: "
            f"blocks are stored for TP sizes up to {max_tp_size}, so this rank would own part of a stored head "
            f"group; set max_tp_size to at least {tp_size} (one of {list(MAX_TP_SIZES)}) in every pool sharing "
            "the store"
        )
    group = canonical_group_size(total_kv_heads, is_mla, max_tp_size)
    if is_mla:
        return HeadPlan(1, 1, 0, 1, writes=tp_rank == 0)
    if tp_size not in supported:
        raise ValueError(
            f"tensor_parallel_size={tp_size} cannot share UCM blocks for a model with {total_kv_heads} "
            f"KV heads stored in groups of {group}; supported tensor parallel sizes: {supported}"
        )
    if tp_size <= total_kv_heads:
        local = total_kv_heads // tp_size
        return HeadPlan(total_kv_heads, group, tp_rank * local, local, writes=True)
    replicas = tp_size // total_kv_heads
    return HeadPlan(total_kv_heads, 1, tp_rank // replicas, 1, writes=tp_rank % replicas == 0)
