"""Paged KV caches allocated the way attention backends allocate them, filled with random values.

Used by the transfer benchmark, the GPU check and the tests, so all three exercise the same
layouts: vLLM 0.32's per-layer ``[B, H, N, K+V]`` views over one allocation in any physical order
(e.g. ``LBHNC``: layer-major, heads before tokens; ``BLNHC``: block-major, tokens before heads), and
the per-layer FlashAttention, FlashInfer and MLA tensors.
"""

from __future__ import annotations

import torch

from ucm.transfer.paged import CacheLayout

_LOGICAL = "LBHNC"


def make_paged_cache(
    layout: CacheLayout,
    *,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_heads: int,
    head_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    physical: str = "LBHNC",
    seed: int | None = 0,
) -> list[torch.Tensor]:
    """One tensor per layer in `layout` (for MLA `num_heads` is ignored and `head_size` is the latent).

    `physical` (BHNC and MLA only) is the memory order of the logical ``[L, B, H, N, C]`` axes, as in
    vLLM's `KVCacheLayout` names; all layers share one allocation like vLLM's allocator makes.
    """
    device = torch.device(device)
    # Generate on the target device (a GPU fills GiBs in milliseconds; values differ from CPU's).
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32, device=device).to(dtype)

    if layout in (CacheLayout.BHNC, CacheLayout.MLA):
        heads, content = (1, head_size) if layout is CacheLayout.MLA else (num_heads, 2 * head_size)
        if sorted(physical) != sorted(_LOGICAL):
            raise ValueError(f"physical must be a permutation of {_LOGICAL}, got {physical!r}")
        sizes = dict(zip(_LOGICAL, (num_layers, num_blocks, heads, block_size, content), strict=True))
        raw = rand(*(sizes[a] for a in physical))
        logical = raw.permute(*(physical.index(a) for a in _LOGICAL))
        return [logical[i] for i in range(num_layers)]
    if layout is CacheLayout.FLASH_ATTN:
        return [rand(2, num_blocks, block_size, num_heads, head_size) for _ in range(num_layers)]
    if layout is CacheLayout.FLASHINFER:
        return [rand(num_blocks, 2, block_size, num_heads, head_size) for _ in range(num_layers)]
    if layout is CacheLayout.MLA_3D:
        return [rand(num_blocks, block_size, head_size) for _ in range(num_layers)]
    raise ValueError(f"unknown layout {layout!r}")
