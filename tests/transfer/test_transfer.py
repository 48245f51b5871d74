"""Correctness of the transfer path: canonical views, gather/scatter and layer-wise batches.

Runs on CPU in CI; `UCM_TEST_DEVICE=cuda` (used by `make gpu-check`) runs the same tests on a GPU,
where the side-stream/event paths and pinned buffers are exercised.
"""

from __future__ import annotations

import os

import pytest
import torch

from ucm.transfer import (
    CacheLayout,
    HeadGroup,
    HostBufferPool,
    LoadBatch,
    PagedKV,
    PoolExhausted,
    SaveBatch,
    canonical_view,
    gather_blocks,
    scatter_blocks,
)
from ucm.transfer import paged as paged_module
from ucm.transfer.paged import gather_groups, scatter_groups, scatter_groups_layer
from ucm.transfer.synthetic import make_paged_cache

DEVICE = os.environ.get("UCM_TEST_DEVICE", "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.fail("UCM_TEST_DEVICE=cuda but torch.cuda.is_available() is False", pytrace=False)

L, B, N, H, D = 3, 12, 16, 4, 8
CASES = [
    (CacheLayout.BHNC, "LBHNC"),
    (CacheLayout.BHNC, "LBNHC"),
    (CacheLayout.BHNC, "BLNHC"),
    (CacheLayout.BHNC, "BHLNC"),
    (CacheLayout.FLASH_ATTN, "LBHNC"),
    (CacheLayout.FLASHINFER, "LBHNC"),
    (CacheLayout.MLA, "LBHNC"),
    (CacheLayout.MLA_3D, "LBHNC"),
]


def cache(layout: CacheLayout, physical: str = "LBHNC", seed: int | None = 0) -> list[torch.Tensor]:
    return make_paged_cache(
        layout, num_layers=L, num_blocks=B, block_size=N, num_heads=H, head_size=D,
        device=DEVICE, physical=physical, seed=seed,
    )


def heads_of(layout: CacheLayout) -> int:
    return 1 if layout.is_mla else H


def reference_payload(tensors: list[torch.Tensor], layout: CacheLayout, block: int) -> torch.Tensor:
    """The canonical payload of one block, computed naively per layer from the raw tensors."""
    layers = []
    for t in tensors:
        if layout is CacheLayout.BHNC:
            layers.append(t[block].unflatten(-1, (2, D)))  # [H, N, 2, D]
        elif layout is CacheLayout.FLASH_ATTN:
            layers.append(t[:, block].permute(2, 1, 0, 3))
        elif layout is CacheLayout.FLASHINFER:
            layers.append(t[block].permute(2, 1, 0, 3))
        elif layout is CacheLayout.MLA:
            layers.append(t[block].unsqueeze(-2))
        else:
            layers.append(t[block].unsqueeze(0).unsqueeze(2))
    return torch.stack(layers)


@pytest.fixture(params=["rows", "block_copies"])
def scatter_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through both CPU scatter strategies: the row scatter (small blocks) and one
    strided copy per block (large blocks); the test caches are tiny, so the size threshold that
    picks between them is moved instead of the block size."""
    threshold = 0 if request.param == "block_copies" else 1 << 62
    monkeypatch.setattr(paged_module, "_MIN_BLOCK_COPY_BYTES", threshold)
    return str(request.param)


@pytest.mark.parametrize(("layout", "physical"), CASES)
def test_gather_matches_naive_reference_and_scatter_round_trips(
    layout: CacheLayout, physical: str, scatter_path: str
) -> None:
    src = cache(layout, physical)
    paged = PagedKV(src, layout, D)
    if layout in (CacheLayout.BHNC, CacheLayout.MLA):
        assert paged.stacked is not None  # one allocation -> one indexing call per batch
    ids = torch.tensor([7, 2, 11, 0], device=DEVICE)
    out = torch.empty((4, *paged.payload_shape(heads_of(layout))), dtype=paged.dtype, device=DEVICE)
    gather_blocks(paged, ids, 0, heads_of(layout), out)
    for i, b in enumerate(ids.tolist()):
        assert torch.equal(out[i], reference_payload(src, layout, b))

    dst_tensors = cache(layout, physical, seed=1)
    dst = PagedKV(dst_tensors, layout, D)
    dst_ids = torch.tensor([1, 3, 5, 9], device=DEVICE)
    before = [t.clone() for t in dst_tensors]
    scatter_blocks(dst, dst_ids, 0, heads_of(layout), out)
    for i, b in enumerate(dst_ids.tolist()):
        assert torch.equal(reference_payload(dst_tensors, layout, b), out[i])
    untouched = [b for b in range(B) if b not in dst_ids.tolist()]
    for b in untouched:  # nothing else was written
        assert torch.equal(reference_payload(dst_tensors, layout, b), reference_payload(before, layout, b))


def test_head_slices_select_exactly_the_heads() -> None:
    src = cache(CacheLayout.FLASH_ATTN)
    paged = PagedKV(src, CacheLayout.FLASH_ATTN, D)
    ids = torch.tensor([4, 1], device=DEVICE)
    out = torch.empty((2, *paged.payload_shape(2)), dtype=paged.dtype, device=DEVICE)
    gather_blocks(paged, ids, 1, 2, out)
    for i, b in enumerate(ids.tolist()):
        assert torch.equal(out[i], reference_payload(src, CacheLayout.FLASH_ATTN, b)[:, 1:3])


def test_separate_layer_allocations_fall_back_to_per_layer_copies() -> None:
    src = cache(CacheLayout.FLASHINFER)
    paged = PagedKV(src, CacheLayout.FLASHINFER, D)
    assert paged.stacked is None
    ids = torch.tensor([3], device=DEVICE)
    out = torch.empty((1, *paged.payload_shape(H)), dtype=paged.dtype, device=DEVICE)
    gather_blocks(paged, ids, 0, H, out)
    assert torch.equal(out[0], reference_payload(src, CacheLayout.FLASHINFER, 3))


def test_wrong_shape_is_a_clear_error() -> None:
    bad = torch.zeros(4, 2, 16, 8, 7)
    with pytest.raises(ValueError, match=r"FLASHINFER.*expected \[blocks, 2, block_size, heads, 8\]"):
        canonical_view(bad, CacheLayout.FLASHINFER, 8)
    with pytest.raises(ValueError, match="BHNC"):
        canonical_view(torch.zeros(4, 8, 16, 15), CacheLayout.BHNC, 8)


@pytest.mark.parametrize(("layerwise", "staged"), [(True, True), (True, None), (False, None)])
@pytest.mark.parametrize(("src_layout", "dst_layout"), [
    (CacheLayout.BHNC, CacheLayout.FLASH_ATTN),
    (CacheLayout.FLASHINFER, CacheLayout.BHNC),
    (CacheLayout.MLA, CacheLayout.MLA_3D),
])
def test_save_and_load_batches_across_layouts(
    src_layout: CacheLayout, dst_layout: CacheLayout, layerwise: bool, staged: bool | None, scatter_path: str
) -> None:
    pool = HostBufferPool(64 << 20)
    src_tensors = cache(src_layout)
    src = PagedKV(src_tensors, src_layout, D)
    heads = heads_of(src_layout)
    groups = [HeadGroup(h, 1) for h in range(heads)]
    save = SaveBatch(src, [5, 6, 8], groups, pool, layerwise=layerwise, staged=staged)
    if layerwise:
        for layer in (0, 2):  # layer 1 is never announced: finish() must still copy it
            save.save_layer(layer)
    payload = save.finish()
    granule = 1 << 16  # the layer-major staging was released; only the payload is held
    assert pool.in_use_bytes == -(-payload.raw.numel() // granule) * granule
    assert len(payload.block_buffers()) == len(groups) * 3

    dst_tensors = cache(dst_layout, seed=3)
    dst = PagedKV(dst_tensors, dst_layout, D)
    load = LoadBatch(dst, [0, 10, 4], groups, payload.tensor)
    load.start()
    load.wait_layer(1)
    load.finish()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for s, d in zip([5, 6, 8], [0, 10, 4], strict=True):
        assert torch.equal(reference_payload(src_tensors, src_layout, s), reference_payload(dst_tensors, dst_layout, d))
    payload.release()
    assert pool.in_use_bytes == 0


def test_pool_is_bounded_and_reuses_buffers() -> None:
    pool = HostBufferPool(2 << 20, pin=False)
    a = pool.acquire(1 << 20)
    b = pool.acquire((1 << 20) - 100)
    with pytest.raises(PoolExhausted, match="in use"):
        pool.acquire(10, timeout=0.05)
    pool.release(a)
    c = pool.acquire((1 << 20) - 5000)  # same 64 KiB-rounded size: reuses the released buffer
    assert c.data_ptr() == a.data_ptr()
    assert pool.allocated_bytes == 2 << 20
    with pytest.raises(ValueError, match="exceeds the pool capacity"):
        pool.acquire(3 << 20)
    pool.release(b)
    pool.release(c)
    assert pool.in_use_bytes == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="pinned memory needs CUDA")
def test_pool_pins_on_cuda() -> None:
    pool = HostBufferPool(4 << 20)
    buf = pool.acquire(1024)
    assert buf.is_pinned()
    pool.release(buf)


@pytest.mark.parametrize("staged", [True, False])
def test_two_head_groups_of_two_round_trip(staged: bool, scatter_path: str) -> None:
    pool = HostBufferPool(16 << 20)
    src_tensors = cache(CacheLayout.BHNC, "LBNHC")
    src = PagedKV(src_tensors, CacheLayout.BHNC, D)
    groups = [HeadGroup(0, 2), HeadGroup(2, 2)]
    save = SaveBatch(src, [1, 9], groups, pool, staged=staged)
    for layer in range(L):
        save.save_layer(layer)
    payload = save.finish()
    for g, group in enumerate(groups):  # payload[g, i] is block i's heads of group g
        for i, b in enumerate([1, 9]):
            want = reference_payload(src_tensors, CacheLayout.BHNC, b)[:, group.start : group.start + 2]
            assert torch.equal(payload.tensor[g, i].to(want.device), want)
    dst_tensors = cache(CacheLayout.FLASH_ATTN, seed=5)
    dst = PagedKV(dst_tensors, CacheLayout.FLASH_ATTN, D)
    load = LoadBatch(dst, [3, 4], groups, payload.tensor)
    load.finish()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for s, d in ((1, 3), (9, 4)):
        assert torch.equal(reference_payload(src_tensors, CacheLayout.BHNC, s), reference_payload(dst_tensors, CacheLayout.FLASH_ATTN, d))
    payload.release()
    with pytest.raises(ValueError, match="consecutive"):
        SaveBatch(src, [1], [HeadGroup(2, 2), HeadGroup(0, 2)], pool)


@pytest.mark.parametrize(("layout", "physical"), [(CacheLayout.BHNC, "LBHNC"), (CacheLayout.FLASHINFER, "LBHNC")])
@pytest.mark.parametrize("order", [[(0, 2), (2, 2)], [(2, 2), (0, 2)], [(1, 1), (3, 1)], [(0, 1), (1, 1), (3, 1)]])
def test_scatter_groups_in_any_order_writes_exactly_their_heads(
    layout: CacheLayout, physical: str, order: list[tuple[int, int]], scatter_path: str
) -> None:
    """Consecutive groups take the one-view path; reversed or gapped groups fall back per group.
    Both the all-layer and the per-layer scatter write group g's payload into its heads only."""
    ids = [6, 2, 7]
    for per_layer in (False, True):
        count = order[0][1]
        src = torch.randn((len(order), len(ids), L, count, N, 2, D), device=DEVICE).to(torch.bfloat16)
        dst_tensors = cache(layout, physical, seed=4)
        before = [reference_payload(dst_tensors, layout, b) for b in range(B)]
        dst = PagedKV(dst_tensors, layout, D)
        block_ids = torch.tensor(ids, device=DEVICE)
        if per_layer:
            for layer in range(L):
                scatter_groups_layer(dst, layer, block_ids, order, src[:, :, layer])
        else:
            scatter_groups(dst, block_ids, order, src)
        for b in range(B):
            want = before[b].clone()
            if b in ids:
                for g, (start, count) in enumerate(order):
                    want[:, start : start + count] = src[g, ids.index(b)]
            assert torch.equal(reference_payload(dst_tensors, layout, b), want), (b, per_layer)
        back = torch.empty_like(src)
        gather_groups(dst, block_ids, order, back)  # and the gather reads the same heads back
        assert torch.equal(back, src)


def test_block_copy_scatter_rejects_out_of_range_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE != "cpu":
        pytest.skip("the per-block copy scatter is the CPU path")
    monkeypatch.setattr(paged_module, "_MIN_BLOCK_COPY_BYTES", 0)
    dst_tensors = cache(CacheLayout.BHNC)
    before = [t.clone() for t in dst_tensors]
    dst = PagedKV(dst_tensors, CacheLayout.BHNC, D)
    src = torch.zeros((2, *dst.payload_shape(H)), dtype=dst.dtype)
    for bad in ([1, -1], [1, B]):
        with pytest.raises(IndexError, match=rf"block ids must be in \[0, {B}\)"):
            scatter_blocks(dst, torch.tensor(bad), 0, H, src)
    assert all(torch.equal(a, b) for a, b in zip(dst_tensors, before, strict=True))  # nothing written
