"""`ucm bench sparse`'s vLLM-path offload replay: real FileStore, the worker half's hooks over every
layer; offloaded GPU blocks are poisoned with NaN, so equal outputs prove none was read."""

from __future__ import annotations

import torch

from ucm.sparse.bench_data import LayerQKV
from ucm.sparse.bench_vllm_offload import bench_vllm_offload
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


def test_gpu_check_offload_logic_on_cpu() -> None:
    """`make gpu-check` runs this on CUDA; on CPU tensors it must pass the same criteria."""
    from ucm.sparse.gpu_check import check_vllm_offload

    result = check_vllm_offload(device="cpu", tokens=1024, layers=2)
    assert result["ok"] and result["prefetch"]["max_abs_diff_vs_resident"] == 0.0
