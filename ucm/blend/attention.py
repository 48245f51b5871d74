"""Attention for a subset of a step's queries, at their original positions, over the paged cache.

Why our own (not the backend's kernel): after the check layer cache blend runs only the selected
tokens, which are scattered through the prompt; vLLM's kernels assume each request's queries are
its last `query_len` tokens, so their causal mask would be wrong. Here every selected query attends
to its request's whole KV (loaded and fresh, both already in the cache) up to its own position.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ucm.transfer.paged import KVLayout, request_kv


def subset_attention(
    query: torch.Tensor, selected: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout, attn_metadata: Any,
    scale: float, output: torch.Tensor,
) -> None:
    """Write attention of `query` ([n, heads, head]: the step's tokens at batch indices `selected`,
    sorted) into `output` ([n, heads*head] or [n, heads, head])."""
    num_heads, head_size = query.shape[1], query.shape[2]
    out = output.view(output.shape[0], num_heads, head_size)
    qsl = attn_metadata.query_start_loc.to(selected.device)
    bounds = torch.searchsorted(selected, qsl).tolist()
    qsl_list, seq_lens = qsl.tolist(), attn_metadata.seq_lens.tolist()
    for row, seq_len in enumerate(seq_lens):
        a, b = bounds[row], bounds[row + 1]
        if a == b:
            continue
        k, v = request_kv(kv_cache, layout, attn_metadata.block_table[row], seq_len, head_size)
        first = seq_len - (qsl_list[row + 1] - qsl_list[row])  # position of the row's first query
        q_pos = selected[a:b] - qsl_list[row] + first
        mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        q = query[a:b].transpose(0, 1)  # [heads, n, head]
        groups = num_heads // k.shape[1]
        kk = k.transpose(0, 1).repeat_interleave(groups, dim=0)
        vv = v.transpose(0, 1).repeat_interleave(groups, dim=0)
        result = F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask, scale=scale)
        out[a:b] = result.transpose(0, 1).to(out.dtype)
