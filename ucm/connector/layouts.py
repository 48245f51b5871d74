"""Which KV layout a worker's cache tensors have.

Decided from the attention spec and the tensors' shapes together, never guessed from one alone:
a shape that fits no known layout is a start-up error that says what was expected.

Head groups are planned in `ucm.connector.heads`.
"""

from __future__ import annotations

from ucm.transfer.paged import CacheLayout


def detect_layout(
    shape: tuple[int, ...],
    *,
    num_blocks: int,
    block_size: int,
    num_heads: int,
    head_size: int,
    head_size_v: int,
    is_mla: bool,
    layer_name: str = "?",
) -> CacheLayout:
    """The layout of one layer's cache tensor from its shape and the attention spec.

    vLLM 0.32 gives connectors ``[blocks, heads, block_size, k+v]`` views (MLA: heads = 1); the 5-D
    FlashAttention/FlashInfer and 3-D MLA shapes of other vLLM builds are accepted too. Block count
    disambiguates FlashAttention from FlashInfer when both leading dims could be 2.
    """
    b, n, h, d = num_blocks, block_size, num_heads, head_size
    if is_mla:
        candidates = {CacheLayout.MLA: (b, 1, n, d), CacheLayout.MLA_3D: (b, n, d)}
    else:
        if head_size_v != head_size:
            raise ValueError(
                f"layer {layer_name}: K head size {head_size} != V head size {head_size_v}; UCM stores "
                "K and V with one head size"
            )
        candidates = {
            CacheLayout.BHNC: (b, h, n, 2 * d),
            CacheLayout.FLASH_ATTN: (2, b, n, h, d),
            CacheLayout.FLASHINFER: (b, 2, n, h, d),
        }
    for layout, expected in candidates.items():
        if tuple(shape) == expected:
            return layout
    options = "; ".join(f"{lay.name} {list(s)}" for lay, s in candidates.items())
    raise ValueError(
        f"layer {layer_name}: KV cache tensor shape {list(shape)} matches no supported layout for "
        f"num_blocks={b} block_size={n} kv_heads={h} head_size={d}{' (MLA)' if is_mla else ''}; "
        f"expected one of: {options}"
    )
