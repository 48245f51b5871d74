"""Block retrieval on vLLM 0.32's CPU attention backend, with its real kernel and metadata.

Why its own tests: the CPU backend packs K transposed inside each block (`KVLayout.CPU_VEC`), and its
kernel follows a work partition computed ahead of time from the dense `seq_lens`; a compacted row
read through the GPU layout, or run with the stale partition, gives wrong attention without any
error. Here the cache is written by vLLM's own CPU writer and attention is vLLM's own CPU kernel.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ucm.sparse import create_sparse, vllm_patch
from ucm.sparse.paged import LayerKV, paged_reference_attention
from ucm.transfer.paged import KVLayout

ops = pytest.importorskip("vllm._custom_ops")
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")

H, HQ, D, BS = 2, 4, 64, 32
ISA = "vec"
LAYER = "model.layers.0.self_attn.attn"

pytestmark = pytest.mark.usefixtures("clean_sparse")


def cpu_impl() -> Any:
    """The real CPU impl; its constructor reads only the model dtype of the current vLLM config."""
    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_attn, "get_current_vllm_config", lambda: config)
        return cpu_attn.CPUAttentionBackendImpl(HQ, D, D**-0.5, H, None, None, "auto")


def cpu_batch(seq_lens: list[int], query_lens: list[int], seed: int = 0) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """A CPU cache written by vLLM's CPU writer (blocks shuffled across rows), its real metadata with
    the kernel's dense work partition, and the step's queries."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_row = [math.ceil(n / BS) for n in seq_lens]
    num_blocks = sum(blocks_per_row) + 3
    order = torch.randperm(num_blocks, generator=gen)[: sum(blocks_per_row)]
    kv_cache = torch.zeros(num_blocks, H, BS, 2 * D)
    key_cache, value_cache = kv_cache.view(num_blocks, H, 2 * BS, D).chunk(2, dim=2)
    table = torch.zeros(len(seq_lens), max(blocks_per_row), dtype=torch.int32)
    start = 0
    for row, (n, nb) in enumerate(zip(seq_lens, blocks_per_row, strict=True)):
        table[row, :nb] = order[start : start + nb].to(torch.int32)
        start += nb
        # keys with structure (a few directions per block) so that selection has something to find
        k = torch.randn(n, H, D, generator=gen) + 3 * torch.randn(nb, H, D, generator=gen).repeat_interleave(BS, 0)[:n]
        v = torch.randn(n, H, D, generator=gen)
        slots = table[row].long().repeat_interleave(BS)[:n] * BS + torch.arange(n) % BS
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, ISA)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    slot_mapping = torch.cat([
        table[row].long().repeat_interleave(BS)[n - q : n] * BS + torch.arange(n - q, n) % BS
        for row, (n, q) in enumerate(zip(seq_lens, query_lens, strict=True))
    ])
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=HQ, num_kv_heads=H, head_dim=D, seq_lens=lens, dtype=torch.float32,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=ISA, enable_kv_split=False,
    )
    metadata = cpu_attn.CPUAttentionMetadata(
        num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens), query_start_loc=qsl,
        max_seq_len=max(seq_lens), seq_lens=lens, block_table=table, slot_mapping=slot_mapping,
        scheduler_metadata=schedule,
    )
    query = torch.randn(int(qsl[-1]), HQ, D, generator=gen)
    return kv_cache, metadata, query


def run_kernel(kv_cache: torch.Tensor, metadata: Any, query: torch.Tensor, wrapped: bool, seen: list[Any]) -> torch.Tensor:
    """The CPU impl's forward (through the sparse wrapper if `wrapped`), recording the metadata
    the kernel was given."""
    impl = cpu_impl()
    layer = SimpleNamespace(layer_name=LAYER, isa=ISA, _k_scale_float=1.0, _v_scale_float=1.0)

    def kernel(self: Any, layer: Any, q: Any, k: Any, v: Any, cache: Any, md: Any, output: Any) -> Any:
        seen.append(md)
        return cpu_attn.CPUAttentionBackendImpl.forward(self, layer, q, k, v, cache, md, output)

    forward = vllm_patch.make_attention_wrapper(kernel, "cpu_vec") if wrapped else kernel
    output = torch.zeros(query.shape[0], HQ * D)
    forward(impl, layer, query, query[:, :H], query[:, :H], kv_cache, metadata, output)
    return output.view(-1, HQ, D)


SEQ_LENS, QUERY_LENS = [40 * BS + 5, 24 * BS, 10 * BS], [1, 1, 7]  # two decode rows and a prefill chunk


def test_cpu_cache_views_are_what_vllms_cpu_writer_wrote() -> None:
    kv_cache = torch.zeros(3, H, BS, 2 * D)
    key_cache, value_cache = kv_cache.view(3, H, 2 * BS, D).chunk(2, dim=2)
    k, v = torch.randn(2 * BS, H, D), torch.randn(2 * BS, H, D)
    slots = torch.tensor([2] * BS + [0] * BS) * BS + torch.arange(2 * BS) % BS
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, ISA)
    paged = LayerKV.from_layer_cache(kv_cache, KVLayout.CPU_VEC, D)
    assert torch.equal(paged.key_cache[2], k[:BS]) and torch.equal(paged.value_cache[0], v[BS:])
    paged.key_cache[1, 4, 1] = 7.0  # a view: a write lands where the kernel reads K
    assert torch.equal(paged.key_cache[1, 4, 1], torch.full((D,), 7.0))
    # a stored block (its bytes in the cache's own layout) written back into another block
    paged.write_blocks(torch.tensor([1]), kv_cache[2].unflatten(-1, (2, D)).unsqueeze(0).clone())
    assert torch.equal(paged.key_cache[1], k[:BS]) and torch.equal(paged.value_cache[1], v[:BS])


def test_keep_one_equals_the_dense_kernel_exactly() -> None:
    kv_cache, metadata, query = cpu_batch(SEQ_LENS, QUERY_LENS)
    dense = run_kernel(kv_cache, metadata, query, False, [])
    sparse = create_sparse({"name": "block_retrieval", "keep_ratio": 1.0, "min_blocks": 4}, "worker")
    sparse.execute_begin(None)
    out = run_kernel(kv_cache, metadata, query, True, [])
    sparse.execute_finished()
    assert torch.equal(out, dense)


def test_compacted_rows_run_on_the_real_kernel_with_a_partition_for_their_lengths() -> None:
    kv_cache, metadata, query = cpu_batch(SEQ_LENS, QUERY_LENS)
    dense = run_kernel(kv_cache, metadata, query, False, [])
    sparse = create_sparse({"name": "block_retrieval", "keep_ratio": 0.25, "min_blocks": 4}, "worker")
    seen: list[Any] = []
    sparse.execute_begin(None)
    out = run_kernel(kv_cache, metadata, query, True, seen)
    sparse.execute_finished()
    md = seen[0]
    assert md.seq_lens[0] < SEQ_LENS[0] and md.seq_lens[1] < SEQ_LENS[1]  # both decode rows compacted
    assert md.seq_lens[2] == SEQ_LENS[2]  # the prefill chunk stays dense
    assert md.scheduler_metadata is not metadata.scheduler_metadata
    # the real kernel computed exactly the attention over the blocks the compacted table lists
    paged = LayerKV.from_layer_cache(kv_cache, KVLayout.CPU_VEC, D)
    expected = paged_reference_attention(query, paged, md, D**-0.5)
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2:], dense[2:], rtol=1e-5, atol=1e-5)  # the prefill rows are dense
    assert not torch.allclose(out[:2], dense[:2], atol=1e-4)  # decode rows did attend to fewer blocks


def test_other_cpu_isas_stay_dense_and_refuse_offload() -> None:
    kv_cache, metadata, query = cpu_batch([40 * BS], [1])
    create_sparse({"name": "block_retrieval", "keep_ratio": 0.25, "min_blocks": 4}, "worker")
    seen: list[Any] = []
    impl = cpu_impl()
    layer = SimpleNamespace(layer_name=LAYER, isa="amx", _k_scale_float=1.0, _v_scale_float=1.0)
    forward = vllm_patch.make_attention_wrapper(lambda self, layer, q, k, v, c, md, out: seen.append(md), "cpu_vec")
    forward(impl, layer, query, query, query, kv_cache, metadata, torch.zeros(1, HQ * D))
    assert seen == [metadata]
