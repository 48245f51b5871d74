"""ReRoPE over vLLM's paged KV cache: one request row at a time, keys and values read by block table.

Why per row and from the cache: a row's queries (a prefill chunk, or one decode token) attend to the
row's whole sequence, most of which was written in earlier steps; the cache, read through the row's
block table up to `seq_lens[row]`, holds all of it (this step's K/V included: vLLM 0.32 writes them
before calling the backend's forward). Query positions follow from the metadata: the row's queries
are its last `query_len` tokens, so they sit at `seq_len - query_len ... seq_len - 1`.

Cache layouts (checked against the real kernels' writers in tests/window):
- `CPU_VEC`: vLLM's CPU backend (ISA "vec"/"vec16", what AVX2/AVX-512 machines run for float32 and
  bfloat16): [blocks, kv_heads, block_size, 2*head] viewed as [blocks, kv_heads, 2*block_size, head];
  the first half of each (block, head) holds K transposed ([head, block_size]), the second V
  ([block_size, head]).
- `BHNC`: vLLM 0.32's FlashAttention/Triton view, [blocks, kv_heads, block_size, K|V].
"""

from __future__ import annotations

import enum
import math
from typing import Any

import torch

from ucm.window.config import WindowConfig
from ucm.window.rerope import rerope_attention
from ucm.window.rope import RopeSpec


class KVLayout(enum.Enum):
    CPU_VEC = "cpu_vec"
    BHNC = "bhnc"


def request_kv(
    kv_cache: torch.Tensor, layout: KVLayout, block_ids: torch.Tensor, seq_len: int, head_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [seq_len, kv_heads, head] of one request, gathered from its physical `block_ids`."""
    num_blocks, heads, block_size, last = kv_cache.shape
    if last != 2 * head_size:
        raise ValueError(f"KV cache of shape {list(kv_cache.shape)}: expected last dim 2*head_size={2 * head_size}")
    used = block_ids[: math.ceil(seq_len / block_size)].to(device=kv_cache.device, dtype=torch.long)
    if layout is KVLayout.CPU_VEC:
        halves = kv_cache.view(num_blocks, heads, 2, block_size * head_size)[used]  # [n, H, 2, bs*D]
        k = halves[:, :, 0].reshape(-1, heads, head_size, block_size).permute(0, 3, 1, 2)  # [n, bs, H, D]
        v = halves[:, :, 1].reshape(-1, heads, block_size, head_size).transpose(1, 2)
    else:
        blocks = kv_cache[used].reshape(-1, heads, block_size, 2, head_size)  # [n, H, bs, 2, D]
        k, v = blocks[:, :, :, 0].transpose(1, 2), blocks[:, :, :, 1].transpose(1, 2)
    return k.reshape(-1, heads, head_size)[:seq_len], v.reshape(-1, heads, head_size)[:seq_len]


def long_rows(attn_metadata: Any, window: int) -> list[int]:
    """Request rows whose sequence is longer than the window: only they differ from plain attention."""
    seq_lens = attn_metadata.seq_lens.tolist()
    return [row for row, n in enumerate(seq_lens) if n > window]


def paged_rerope(
    query: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout, attn_metadata: Any, rows: list[int],
    rope: RopeSpec, config: WindowConfig, scale: float, output: torch.Tensor,
) -> None:
    """Write ReRoPE attention of `rows` into `output` ([tokens, heads*head] or [tokens, heads, head]);
    `query` is [tokens, heads, head], rotated by the model. Other rows of `output` are left alone."""
    num_heads, head_size = query.shape[1], query.shape[2]
    out = output.view(output.shape[0], num_heads, head_size)
    qsl = attn_metadata.query_start_loc.tolist()
    seq_lens = attn_metadata.seq_lens.tolist()
    for row in rows:
        start, stop, seq_len = qsl[row], qsl[row + 1], seq_lens[row]
        if stop == start:
            continue
        k, v = request_kv(kv_cache, layout, attn_metadata.block_table[row], seq_len, head_size)
        positions = torch.arange(seq_len - (stop - start), seq_len, device=query.device)
        out[start:stop] = rerope_attention(query[start:stop], k, v, positions, rope, config, scale).to(out.dtype)
