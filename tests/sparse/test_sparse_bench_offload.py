"""`ucm bench sparse`'s vLLM-path offload replay: real FileStore, the worker half's hooks over every
layer; offloaded GPU blocks are poisoned with NaN, so equal outputs prove none was read."""

from __future__ import annotations

import pathlib

import torch

from ucm.bench.sparse_data import LayerQKV
from ucm.bench.sparse_vllm_offload import bench_vllm_offload
from ucm.sparse.block_retrieval import BlockRetrievalConfig
from ucm.sparse.vllm_offload import num_slots


def test_offload_replay_equals_resident_and_holds_fewer_blocks() -> None:
    gen = torch.Generator().manual_seed(3)
    t, heads, group, d, bs = 40 * 8, 2, 2, 8, 8
    layers = [LayerQKV(i, torch.randn(t, heads * group, d, generator=gen), torch.randn(t, heads, d, generator=gen),
                       torch.randn(t, heads, d, generator=gen)) for i in range(3)]
    config = BlockRetrievalConfig.from_dict({"keep_ratio": 0.25, "min_blocks": 4, "offload": True,
                                             "host_cache_blocks": 8})
    result = bench_vllm_offload(config, layers, bs, decode_steps=12)
    nb = t // bs
    assert result["prefetch"]["max_abs_diff_vs_resident"] == result["no_prefetch"]["max_abs_diff_vs_resident"] == 0.0
    assert result["gpu_blocks_resident"] == nb
    slots = num_slots(config, nb)
    # init 1 + local 2 blocks stay, the middle leaves, the slots join
    assert result["slots"] == slots and result["gpu_blocks_offload"] == 3 + slots < nb
    with_, without = result["prefetch"], result["no_prefetch"]
    assert with_["first_step_store_reads"] > 0 and with_["placements_per_step_per_layer"] > 0
    assert 0 <= with_["slot_hit_ratio"] <= 1
    # the same selections either way; prefetch only moves store reads off the critical path
    assert with_["placements_per_step_per_layer"] == without["placements_per_step_per_layer"]
    assert without["prefetched_per_step"] == 0 < with_["prefetched_per_step"]
    keepalive = result["keepalive"]
    assert keepalive["blocks"] == nb and keepalive["touch_us_per_block"] > 0 and keepalive["read_us_per_block"] > 0


def test_gpu_check_offload_logic_on_cpu() -> None:
    """`make gpu-check` runs this on CUDA; on CPU tensors it must pass the same criteria."""
    from ucm.bench.gpu_sparse import check_vllm_offload

    result = check_vllm_offload(device="cpu", tokens=1024, layers=2)
    assert result["ok"] and result["prefetch"]["max_abs_diff_vs_resident"] == 0.0


def test_too_few_slots_shrink_the_selection_instead_of_failing(tmp_path: pathlib.Path) -> None:
    """Should a full pool have kept the scheduler from adding slots while the selection grew, the
    layer attends to the offloaded blocks it can place and counts the rest; it never fails the step."""
    from ucm.bench.sparse_vllm_offload import FileStoreReader
    from ucm.sparse.offload import bytes_view
    from ucm.sparse.paged import LayerKV
    from ucm.sparse.vllm_offload import OffloadedBlock, OffloadUpdate, WorkerOffload
    from ucm.store import FileStore
    from ucm.store.base import BlockLayout
    from ucm.transfer.paged import KVLayout

    heads, bs, d, nb = 2, 4, 8, 10
    blocks = torch.randn(nb, 1, heads, bs, 2, d)  # the stored layout: [layers, heads, bs, K|V, d]
    hashes = [bytes([b]) * 16 for b in range(nb)]
    layout = BlockLayout("float32", tuple(blocks.shape[1:]), 4)
    store = FileStore(tmp_path, salt=b"\x01" * 16, io_threads=2)
    try:
        assert all(store.dump(hashes, [bytes_view(blocks[b]) for b in range(nb)], layout).wait())
        offload = WorkerOffload("mass", host_cache_blocks=4)
        offload.reader = FileStoreReader(store, layout, tuple(blocks.shape[1:]), ["layer"])
        offload.apply([OffloadUpdate("r", anchor=9, first=True, new_slots=(20, 21),
                                     offloaded=tuple(OffloadedBlock(b, b, hashes[b]) for b in (2, 3, 4, 5)))], [], {})
        cache = torch.zeros(24, heads, bs, 2 * d)
        paged = LayerKV.from_layer_cache(cache, KVLayout.BHNC, d)
        physical, selection = offload.place(offload.requests["r"], "layer", torch.tensor([0, 2, 3, 5, 8, 9]),
                                            torch.arange(nb), paged)
        assert selection.tolist() == [0, 2, 3, 8, 9]  # block 5 had no slot left
        assert offload.counters.slot_shortfall == 1 and offload.counters.fetched_blocks == 2
        assert physical[2] in (20, 21) and physical[3] in (20, 21) and physical[0] == 0
        for b in (2, 3):  # the slot holds the stored block's K and V
            torch.testing.assert_close(paged.key_cache[int(physical[b])], blocks[b, 0, :, :, 0].transpose(0, 1))
            torch.testing.assert_close(paged.value_cache[int(physical[b])], blocks[b, 0, :, :, 1].transpose(0, 1))
        offload.close()
    finally:
        store.index_ready.wait(timeout=60)
        store.close()
