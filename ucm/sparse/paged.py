"""Block retrieval over vLLM's paged KV cache: summaries per physical block, compacted block tables.

Why compaction: vLLM's paged attention kernels read exactly the blocks listed in a request row's
block table, up to `seq_lens[row]` tokens. For a decode row (one query token, which sees every
earlier token), attending to a subset of blocks is the same as attending to a block table that
lists only those blocks, in order, with `seq_len = (kept full blocks) * block_size + tokens of the
last block` — keys were already rotated (RoPE) when written, so their slot positions no longer
matter. The kernel itself is untouched; it simply reads fewer blocks. One block table row is shared
by every KV head, so in vLLM the selection is per request row (`rm.shared_block_scores`: merged over
all query heads, each head's own best blocks guaranteed), while the offline `DecodeLayer` selects per
KV head.

Summaries are kept per physical block and refreshed for blocks filled this step (their last slot in the metadata's
`slot_mapping`) plus blocks the scheduler reported as newly assigned or loaded (`fresh_blocks`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ucm.sparse import retrieval_math as rm
from ucm.transfer.paged import KVLayout, kv_views


@dataclasses.dataclass
class LayerKV:
    """One layer's paged cache as two views [num_physical_blocks, block_size, num_kv_heads, head_dim]
    (named apart from `ucm.transfer.paged.PagedKV`, which holds every layer for block transfer), and
    the cache itself as the backend holds it (`blocks`, [blocks, kv_heads, block_size, 2*head]), in
    whose layout the store holds a block's bytes."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    blocks: torch.Tensor

    @classmethod
    def from_layer_cache(cls, kv_cache: torch.Tensor, layout: KVLayout, head_size: int) -> LayerKV:
        """Views (no copy) of one layer's cache as vLLM hands it to the backend: `KVLayout.BHNC` for
        vLLM 0.32's FlashAttention and Triton backends, `KVLayout.CPU_VEC` for its CPU backend."""
        key_cache, value_cache = kv_views(kv_cache, layout, head_size)
        return cls(key_cache, value_cache, kv_cache)

    def write_blocks(self, targets: torch.Tensor, stored: torch.Tensor) -> None:
        """Put whole blocks read from the store (this layer's bytes of each, [n, kv_heads,
        block_size, 2, head] in the cache's own layout) into the physical blocks `targets`."""
        self.blocks[targets] = stored.reshape(stored.shape[0], *self.blocks.shape[1:]).to(self.blocks.device)

    @property
    def block_size(self) -> int:
        return int(self.key_cache.shape[1])


class PagedSummaries:
    """Per-physical-block key summaries of one layer, refreshed for the blocks that fill.

    Memory: what the summary kind scores from, per [heads, blocks] — for "mass" four int8 centres
    with a scale and a radius each (3.9% of a float32 KV cache, 7.0% of a bf16 one at block size 16
    and head_dim 32; 6.4% for bf16 at head_dim 128), two vectors in the cache dtype for "bounds",
    one for "mean" — allocated on the cache's device at the layer's first sparse step. vLLM sizes its KV cache to the memory it is given, so lower
    `--gpu-memory-utilization` by about that share when sparse attention is on.
    """

    def __init__(self, paged: LayerKV, kind: str) -> None:
        nb, _, heads, d = paged.key_cache.shape
        self.kind = kind
        self.heads, self.head_dim = heads, d
        self.dtype, self.device = paged.key_cache.dtype, paged.key_cache.device
        self.data = rm.BlockSummaries.empty(kind, heads, nb, d, paged.key_cache.dtype, paged.key_cache.device)

    def refresh(self, paged: LayerKV, blocks: torch.Tensor) -> None:
        """Recompute the summaries of physical `blocks` from the cache (all slots of each block; a
        partial block's summary is never used for ranking: it is always in the local window)."""
        if blocks.numel() == 0:
            return
        k = paged.key_cache.index_select(0, blocks).permute(2, 0, 1, 3)  # [H, n, bs, D]
        self.data.assign(blocks, rm.build_block_summaries(k, k.shape[1] * k.shape[2], self.kind))

    def of(self, physical: torch.Tensor) -> rm.BlockSummaries:
        """A copy of the summaries of `physical` blocks (a row's, by logical block); the row's
        partial last block is left out of scoring (`rm.shared_block_scores`): its unwritten slots
        hold whatever the block held before."""
        return self.data.take(physical)


def completed_blocks(attn_metadata: Any, block_size: int) -> torch.Tensor:
    """Physical blocks whose last slot is written in this step (padding slots are -1): only they
    need a new summary. A block still filling is always its row's last block, which scoring leaves
    out (`PagedSummaries.of`), so summarising it on every decode step (a k-means over its keys, per
    layer) would be work nobody reads; it is summarised once, when it fills."""
    slots = attn_metadata.slot_mapping[: attn_metadata.num_actual_tokens]
    last = slots[(slots >= 0) & (slots % block_size == block_size - 1)]
    blocks: torch.Tensor = torch.unique(torch.div(last, block_size, rounding_mode="floor"))
    return blocks


def decode_rows(attn_metadata: Any) -> list[int]:
    """Request rows whose query is one token (decode); prefill rows stay dense unless their request
    is offloading (`BlockRetrievalSparse._prefill_selection`)."""
    qsl = attn_metadata.query_start_loc.tolist()
    return [i for i in range(len(qsl) - 1) if qsl[i + 1] - qsl[i] == 1]


def compact_decode_rows(
    attn_metadata: Any, selections: dict[int, torch.Tensor], block_size: int,
    physical: dict[int, torch.Tensor] | None = None,
) -> Any:
    """A copy of `attn_metadata` whose selected rows (decode rows, and prefill chunks of offloading
    requests) list only their selected logical blocks.

    `selections[row]` holds sorted logical block indices that include the row's last block (a
    prefill chunk's selection holds all of its own blocks at the end, so its queries stay the row's
    last tokens and the kernel's causal mask is unchanged).
    `physical[row]`, where given, replaces the row's block ids by logical block (offload: selected
    blocks that left the GPU point at the slots holding them). Other rows, and every tensor not
    touched here, are shared with the original (nothing is modified in place, so other layers keep
    the dense metadata).
    """
    dense_lens = attn_metadata.seq_lens.tolist()
    # a row that keeps every block in place reads what it would anyway: leave it (and, when no row
    # changes, the whole metadata) as it is, so keep_ratio 1.0 is dense attention exactly
    selections = {
        row: logical for row, logical in selections.items()
        if logical.numel() != math.ceil(dense_lens[row] / block_size) or (physical is not None and row in physical)
    }
    if not selections:
        return attn_metadata
    block_table = attn_metadata.block_table.clone()
    seq_lens = attn_metadata.seq_lens.clone()
    for row, logical in selections.items():
        seq_len = dense_lens[row]
        last = math.ceil(seq_len / block_size) - 1
        if int(logical[-1]) != last:
            raise ValueError(f"row {row}: a decode selection must keep the last block {last}")
        kept = logical.to(block_table.device)
        ids = physical[row] if physical is not None and row in physical else attn_metadata.block_table[row]
        block_table[row, : kept.numel()] = ids[kept].to(block_table.dtype)
        tail = seq_len - last * block_size
        seq_lens[row] = (kept.numel() - 1) * block_size + tail
    changes: dict[str, Any] = {"block_table": block_table, "seq_lens": seq_lens}
    if hasattr(attn_metadata, "max_seq_len"):
        changes["max_seq_len"] = int(seq_lens.max()) if seq_lens.numel() else 0
    if getattr(attn_metadata, "scheduler_metadata", None) is not None:
        changes["scheduler_metadata"] = None  # ahead-of-time schedule was computed for the dense lengths
    return dataclasses.replace(attn_metadata, **changes)


def paged_reference_attention(
    query: torch.Tensor, paged: LayerKV, attn_metadata: Any, scale: float
) -> torch.Tensor:
    """Plain torch paged attention for decode rows (query [T, Hq, D] -> [T, Hq, D]); the CPU
    stand-in for the GPU kernel in tests, reading exactly the block table and seq_lens it is given."""
    out = torch.zeros_like(query, dtype=torch.float32)
    qsl = attn_metadata.query_start_loc.tolist()
    bs = paged.block_size
    for row in range(len(qsl) - 1):
        seq_len = int(attn_metadata.seq_lens[row])
        nb = math.ceil(seq_len / bs)
        blocks = attn_metadata.block_table[row, :nb]
        k = paged.key_cache[blocks].reshape(nb * bs, *paged.key_cache.shape[2:])[:seq_len]
        v = paged.value_cache[blocks].reshape(nb * bs, *paged.value_cache.shape[2:])[:seq_len]
        for t in range(qsl[row], qsl[row + 1]):
            q = query[t]
            heads = k.shape[1]
            group = q.shape[0] // heads
            kk = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
            vv = v.float().repeat_interleave(group, dim=1)
            visible = seq_len - (qsl[row + 1] - t) + 1  # causal: this token and everything before
            logits = torch.einsum("hd,shd->hs", q.float(), kk[:visible]) * scale
            out[t] = torch.einsum("hs,shd->hd", logits.softmax(-1), vv[:visible])
    return out
