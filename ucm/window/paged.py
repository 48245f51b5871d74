"""ReRoPE over vLLM's paged KV cache: one request row at a time, keys and values read by block table.

Why per row and from the cache: a row's queries (a prefill chunk, or one decode token) attend to the
row's whole sequence, most of which was written in earlier steps; the cache, read through the row's
block table up to `seq_lens[row]`, holds all of it (this step's K/V included: vLLM 0.32 writes them
before calling the backend's forward). Query positions follow from the metadata: the row's queries
are its last `query_len` tokens, so they sit at `seq_len - query_len ... seq_len - 1`.

Cache layouts: `ucm.transfer.paged.KVLayout` (checked against the real kernels' writers in tests/window).
"""

from __future__ import annotations

from typing import Any

import torch

from ucm.transfer.paged import KVLayout, request_kv
from ucm.window.config import WindowConfig
from ucm.window.rerope import rerope_attention
from ucm.window.rope import RopeSpec


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
