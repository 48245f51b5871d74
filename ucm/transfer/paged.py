"""Paged KV caches seen through one canonical view, and the vectorised gather/scatter over it.

Attention backends lay out the paged KV cache differently (vLLM 0.32 hands connectors a logical
``[blocks, heads, block_size, k_dim + v_dim]`` view per layer whose physical stride order depends on
the resolved layout; older FlashAttention caches are ``[2, blocks, block_size, heads, head]``,
FlashInfer's ``[blocks, 2, block_size, heads, head]``, MLA's ``[blocks, block_size, latent]``).
Everything here works on one *canonical view* per layer, ``[blocks, S, block_size, heads, head]``
with ``S = 2`` (K, V) or ``S = 1`` (MLA latent), obtained with views only (no copy), so the stored
payload ``[layers, S, block_size, heads_in_group, head]`` is the same whatever the backend.

The hot path never loops over blocks in Python: a batch is one `index_select` (gather) or
`index_copy_` (scatter) per layer, or a single one for all layers when the layers live in one
allocation at a constant stride (vLLM's own allocator does that), which `PagedKV.stacked` finds.
Only torch is imported here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch


class CacheLayout(enum.Enum):
    """How one layer's KV cache tensor is shaped (the logical axes, not the memory order)."""

    BHNC = "blocks,heads,block_size,k+v"  # vLLM 0.32 per-layer view; any stride order
    FLASH_ATTN = "2,blocks,block_size,heads,head"  # FlashAttention-style (K/V outermost)
    FLASHINFER = "blocks,2,block_size,heads,head"  # FlashInfer-style (NHD)
    MLA = "blocks,1,block_size,latent"  # vLLM 0.32 MLA view (one latent "head")
    MLA_3D = "blocks,block_size,latent"  # MLA without the head axis

    @property
    def is_mla(self) -> bool:
        return self in (CacheLayout.MLA, CacheLayout.MLA_3D)


def canonical_view(tensor: torch.Tensor, layout: CacheLayout, head_size: int) -> torch.Tensor:
    """View `tensor` as ``[blocks, S, block_size, heads, head]`` without copying.

    `head_size` is the K (= V) head size, or the latent size for MLA. A shape that does not fit
    the layout raises `ValueError` naming both, so a wrong guess is never silently reinterpreted.
    """
    shape = tuple(tensor.shape)

    def bad(expected: str) -> ValueError:
        return ValueError(
            f"KV cache tensor of shape {list(shape)} does not match layout {layout.name} "
            f"({layout.value}); expected {expected}"
        )

    if layout is CacheLayout.BHNC:
        if tensor.dim() != 4 or shape[3] != 2 * head_size:
            raise bad(f"4 dims with last dim 2*head_size={2 * head_size}")
        return tensor.unflatten(-1, (2, head_size)).permute(0, 3, 2, 1, 4)
    if layout is CacheLayout.FLASH_ATTN:
        if tensor.dim() != 5 or shape[0] != 2 or shape[4] != head_size:
            raise bad(f"[2, blocks, block_size, heads, {head_size}]")
        return tensor.permute(1, 0, 2, 3, 4)
    if layout is CacheLayout.FLASHINFER:
        if tensor.dim() != 5 or shape[1] != 2 or shape[4] != head_size:
            raise bad(f"[blocks, 2, block_size, heads, {head_size}]")
        return tensor
    if layout is CacheLayout.MLA:
        if tensor.dim() != 4 or shape[1] != 1 or shape[3] != head_size:
            raise bad(f"[blocks, 1, block_size, {head_size}]")
        return tensor.transpose(1, 2).unsqueeze(1)  # [B, N, 1, C] -> [B, S=1, N, H=1, C]
    if layout is CacheLayout.MLA_3D:
        if tensor.dim() != 3 or shape[2] != head_size:
            raise bad(f"[blocks, block_size, {head_size}]")
        return tensor.unsqueeze(1).unsqueeze(3)
    raise ValueError(f"unknown KV cache layout {layout!r}")


class PagedKV:
    """All attention layers of one worker's paged KV cache, in canonical form.

    `layers[i]` is ``[num_blocks, S, block_size, heads, head]``; `stacked`, when not None, is the
    same memory as ``[num_blocks, num_layers, S, block_size, heads, head]`` so a whole batch moves
    in one indexing call.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], layout: CacheLayout, head_size: int) -> None:
        if not tensors:
            raise ValueError("PagedKV needs at least one layer")
        self.layout = layout
        self.layers = [canonical_view(t, layout, head_size) for t in tensors]
        first = self.layers[0]
        for i, view in enumerate(self.layers):
            if view.shape != first.shape or view.dtype != first.dtype or view.device != first.device:
                raise ValueError(
                    f"layer {i} KV cache {list(view.shape)} {view.dtype} {view.device} differs from "
                    f"layer 0 {list(first.shape)} {first.dtype} {first.device}"
                )
        self.num_blocks, self.num_states, self.block_size, self.num_heads, self.head_size = first.shape
        self.dtype = first.dtype
        self.device = first.device
        self.stacked = _find_stacked(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def payload_shape(self, num_heads: int) -> tuple[int, int, int, int, int]:
        """Shape of one block's canonical payload for `num_heads` heads."""
        return (self.num_layers, self.num_states, self.block_size, num_heads, self.head_size)

    def block_nbytes(self, num_heads: int) -> int:
        n = self.dtype.itemsize
        for d in self.payload_shape(num_heads):
            n *= d
        return n


def _find_stacked(layers: list[torch.Tensor]) -> torch.Tensor | None:
    """A single strided view over all layers when they share storage at a constant layer stride."""
    if len(layers) == 1:
        return layers[0].unsqueeze(1)
    first = layers[0]
    try:
        base_ptr = first.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() != base_ptr or t.stride() != first.stride() for t in layers):
            return None
    except (RuntimeError, NotImplementedError):
        return None
    offsets = [t.storage_offset() for t in layers]
    layer_stride = offsets[1] - offsets[0]
    if layer_stride <= 0 or any(b - a != layer_stride for a, b in zip(offsets, offsets[1:], strict=False)):
        return None
    size = (first.shape[0], len(layers), *first.shape[1:])
    stride = (first.stride(0), layer_stride, *first.stride()[1:])
    return first.as_strided(size, stride, offsets[0])


def _heads(view: torch.Tensor, head_start: int, head_count: int) -> torch.Tensor:
    if head_start == 0 and head_count == view.shape[-2]:
        return view
    return view.narrow(-2, head_start, head_count)


def gather_blocks(
    paged: PagedKV, block_ids: torch.Tensor, head_start: int, head_count: int, out: torch.Tensor
) -> torch.Tensor:
    """Copy blocks `block_ids` (heads [head_start, +head_count)) into `out`, block-major:
    ``out[i] = payload of block_ids[i]`` with shape ``paged.payload_shape(head_count)``.
    `out` must be contiguous and on the cache's device."""
    if paged.stacked is not None:
        torch.index_select(_heads(paged.stacked, head_start, head_count), 0, block_ids, out=out)
        return out
    for layer, view in enumerate(paged.layers):
        out[:, layer].copy_(torch.index_select(_heads(view, head_start, head_count), 0, block_ids))
    return out


def gather_layer(
    paged: PagedKV,
    layer: int,
    block_ids: torch.Tensor,
    head_start: int,
    head_count: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """One layer of `gather_blocks` into a contiguous ``[n, S, block_size, heads, head]`` `out`."""
    torch.index_select(_heads(paged.layers[layer], head_start, head_count), 0, block_ids, out=out)
    return out


def scatter_blocks(
    paged: PagedKV, block_ids: torch.Tensor, head_start: int, head_count: int, src: torch.Tensor
) -> None:
    """Inverse of `gather_blocks`: write block-major payloads `src` into blocks `block_ids`."""
    if paged.stacked is not None:
        _heads(paged.stacked, head_start, head_count).index_copy_(0, block_ids, src)
        return
    for layer, view in enumerate(paged.layers):
        _heads(view, head_start, head_count).index_copy_(0, block_ids, src[:, layer])


def scatter_layer(
    paged: PagedKV,
    layer: int,
    block_ids: torch.Tensor,
    head_start: int,
    head_count: int,
    src: torch.Tensor,
) -> None:
    """One layer of `scatter_blocks`; `src` is ``[n, S, block_size, heads, head]`` (any strides)."""
    _heads(paged.layers[layer], head_start, head_count).index_copy_(0, block_ids, src)
