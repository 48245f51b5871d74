"""Cache blend's per-token math: stored chunk KV at its new position, and which tokens to recompute.

Re-rotation: vLLM caches K already rotated by RoPE, so a chunk stored at positions 0..n-1 and reused
at p..p+n-1 only needs one more rotation of K by p (rotations compose exactly; V carries no
position). `ucm.window.rope.RopeSpec` is the model's own rotation (its float32 angle table), and it
refuses models this cannot express (partial rotary, rope scaling).

Selection (CacheBlend §4): at the check layer every token is computed afresh; a reused token whose
fresh K deviates most from its loaded K is the one whose KV depends most on the text before it (the
context the chunk did not have when it was stored), so the top `ratio` of each request's reused
tokens by squared deviation is recomputed from there on, the others keep their loaded KV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ucm.transfer.paged import KVLayout, request_kv
from ucm.window.rope import RopeSpec


def stored_kv(blocks: torch.Tensor, layout: KVLayout, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [n * block_size, kv_heads, head] of one layer of `n` whole stored blocks, given as
    that layer's raw block bytes [n, kv_heads, block_size, 2 * head] (the cache's own layout)."""
    n, _heads, block_size, _ = blocks.shape
    ids = torch.arange(n, device=blocks.device)
    return request_kv(blocks, layout, ids, n * block_size, head_size)


def rerotate(k: torch.Tensor, stored_positions: torch.Tensor, new_positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """K [tokens, kv_heads, head] rotated by the model at `stored_positions`, as if at `new_positions`."""
    return rope.rerotate(k, stored_positions, new_positions)


def deviation(fresh: torch.Tensor, loaded: torch.Tensor) -> torch.Tensor:
    """Squared distance [tokens] between fresh and loaded K ([tokens, kv_heads, head]), in float32."""
    return (fresh.to(torch.float32) - loaded.to(torch.float32)).square().sum(dim=(1, 2))


def recompute_count(num_reused: int, ratio: float) -> int:
    """How many of a request's `num_reused` tokens are recomputed at `ratio` (rounded up, so any
    ratio above 0 recomputes at least one token of a reused request)."""
    return min(num_reused, math.ceil(num_reused * ratio - 1e-9))


def select_recompute(dev: torch.Tensor, group_sizes: Sequence[int], ratios: Sequence[float]) -> torch.Tensor:
    """Bool [tokens]: True for the tokens to recompute, the top `ratios[g]` by deviation `dev` within
    each consecutive group g (one group per request); ties go to the earlier token."""
    chosen = torch.zeros(dev.shape[0], dtype=torch.bool, device=dev.device)
    start = 0
    for size, ratio in zip(group_sizes, ratios, strict=True):
        k = recompute_count(size, ratio)
        if k:
            # a stable descending sort, so equal deviations pick deterministically
            order = torch.sort(dev[start : start + size], descending=True, stable=True).indices[:k]
            chosen[start + order] = True
        start += size
    if start != dev.shape[0]:
        raise ValueError(f"group sizes sum to {start}, but {dev.shape[0]} deviations were given")
    return chosen
