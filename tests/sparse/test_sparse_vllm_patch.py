"""The vLLM 0.32 integration: the patch applies to the real backend classes, the version guard
fires, and the wrapper hands the kernel compacted metadata that computes the right attention."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from paged_metadata import triton_metadata

from ucm.sparse import UcmSparseBase, create_sparse, register_sparse, vllm_patch
from ucm.sparse import retrieval_math as rm
from ucm.sparse.paged import LayerKV, paged_reference_attention

triton_attn = pytest.importorskip("vllm.v1.attention.backends.triton_attn")

H, HQ, D, BS = 2, 4, 16, 16
LAYER = "model.layers.0.self_attn.attn"


pytestmark = pytest.mark.usefixtures("clean_sparse")


def test_patch_applies_to_real_vllm_classes_and_restores() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    originals = {cls: cls.forward for cls in (triton_attn.TritonAttentionImpl, FlashAttentionImpl,
                                              CPUAttentionBackendImpl)}
    patched = vllm_patch.install_attention_hooks()
    assert set(patched) == set(originals)
    for cls, original in originals.items():
        assert vllm_patch.is_patched(cls)
        assert cls.forward.__wrapped__ is original  # type: ignore[attr-defined]
    vllm_patch.install_attention_hooks()  # idempotent: not wrapped twice
    assert triton_attn.TritonAttentionImpl.forward.__wrapped__ is originals[triton_attn.TritonAttentionImpl]  # type: ignore[attr-defined]
    vllm_patch.uninstall_attention_hooks()
    for cls, original in originals.items():
        assert cls.forward is original


def test_version_guard() -> None:
    import vllm

    assert vllm.__version__ == "0.32.0"
    assert vllm_patch.check_vllm_version() == "0.32.0"
    with pytest.raises(vllm_patch.VllmVersionError, match=r"vLLM 0\.33\.1 is installed; install vllm==0\.32\.0"):
        vllm_patch.install_attention_hooks(version="0.33.1")
    assert not vllm_patch.is_patched(triton_attn.TritonAttentionImpl)


def test_worker_with_vllm_config_installs_the_hooks() -> None:
    create_sparse({"name": "block_retrieval"}, "worker", vllm_config=SimpleNamespace(cache_config=None))
    assert vllm_patch.is_patched(triton_attn.TritonAttentionImpl)


def build_batch(seq_lens: list[int], query_lens: list[int]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """A BHNC paged cache with shuffled physical blocks and real TritonAttentionMetadata."""
    torch.manual_seed(5)
    blocks_per_row = [math.ceil(s / BS) for s in seq_lens]
    num_physical = sum(blocks_per_row) + 3
    perm = torch.randperm(num_physical)
    kv_cache = torch.randn(num_physical, H, BS, 2 * D)
    starts = [0, *torch.tensor(blocks_per_row).cumsum(0).tolist()]
    tables = [perm[starts[i] : starts[i + 1]].tolist() for i in range(len(seq_lens))]
    metadata = triton_metadata(tables, seq_lens, query_lens, BS)
    return kv_cache, metadata, torch.randn(metadata.num_actual_tokens, HQ, D)


def run_wrapped(kv_cache: torch.Tensor, metadata: Any, query: torch.Tensor, seen: list[Any]) -> torch.Tensor:
    """Call the installed wrapper around a CPU stand-in kernel (the real one needs a GPU)."""

    def kernel(self: Any, layer: Any, q: Any, k: Any, v: Any, cache: Any, md: Any, output: Any, **_: Any) -> Any:
        seen.append(("kernel", md))
        output.copy_(paged_reference_attention(q, LayerKV.from_layer_cache(cache, vllm_patch_layout(), D), md, D**-0.5))
        return output

    wrapper = vllm_patch.make_attention_wrapper(kernel)
    output = torch.zeros_like(query)
    wrapper(SimpleNamespace(head_size=D), SimpleNamespace(layer_name=LAYER), query, None, None, kv_cache, metadata, output)
    return output


def vllm_patch_layout() -> Any:
    from ucm.transfer.paged import KVLayout

    return KVLayout.BHNC


class Recorder(UcmSparseBase):
    name = "recorder_for_tests"
    log: list[Any] = []

    def attention_begin(self, layer_name: str, query: torch.Tensor, paged_kv: Any, attn_metadata: Any) -> Any:
        self.log.append(("begin", layer_name, isinstance(paged_kv, LayerKV)))
        return attn_metadata

    def attention_finished(self, layer_name: str, output: torch.Tensor) -> None:
        self.log.append(("finished", layer_name))


def test_hooks_called_in_order_around_the_kernel() -> None:
    register_sparse("recorder_for_tests", f"{__name__}:Recorder")
    create_sparse({"name": "recorder_for_tests"}, "worker")
    kv_cache, metadata, query = build_batch([20 * BS], [1])
    Recorder.log.clear()
    run_wrapped(kv_cache, metadata, query, Recorder.log)
    assert [e[0] for e in Recorder.log] == ["begin", "kernel", "finished"]
    assert Recorder.log[0] == ("begin", LAYER, True) and Recorder.log[1][1] is metadata


def test_no_active_algorithm_is_dense_passthrough() -> None:
    kv_cache, metadata, query = build_batch([20 * BS], [1])
    seen: list[Any] = []
    run_wrapped(kv_cache, metadata, query, seen)
    assert seen[0][1] is metadata


@pytest.mark.parametrize("keep_ratio", [1.0, 0.25])
def test_compacted_metadata_computes_block_sparse_attention(keep_ratio: float) -> None:
    sparse = create_sparse(
        {"name": "block_retrieval", "keep_ratio": keep_ratio, "min_blocks": 4, "retrieval_stride": 1}, "worker"
    )
    seq_lens, query_lens = [40 * BS + 5, 24 * BS, 10 * BS], [1, 1, 7]  # two decode rows, one prefill row
    kv_cache, metadata, query = build_batch(seq_lens, query_lens)
    dense = paged_reference_attention(query, LayerKV.from_layer_cache(kv_cache, vllm_patch_layout(), D), metadata, D**-0.5)
    original_table = metadata.block_table.clone()
    seen: list[Any] = []
    sparse.execute_begin(None)
    out = run_wrapped(kv_cache, metadata, query, seen)
    sparse.execute_finished()
    md = seen[0][1]
    assert torch.equal(metadata.block_table, original_table)  # the shared metadata is untouched
    assert md.seq_lens[2] == seq_lens[2] and torch.equal(md.block_table[2], original_table[2])  # prefill
    torch.testing.assert_close(out[-7:], dense[-7:])
    if keep_ratio == 1.0:
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
        assert md.seq_lens.tolist() == seq_lens
        return
    paged = LayerKV.from_layer_cache(kv_cache, vllm_patch_layout(), D)
    for row in (0, 1):
        nb = math.ceil(seq_lens[row] / BS)
        keep = rm.num_blocks_to_keep(nb, keep_ratio, 1, 2)
        tail = seq_lens[row] - (nb - 1) * BS
        assert int(md.seq_lens[row]) == (keep - 1) * BS + tail
        kept_physical = md.block_table[row, :keep].tolist()
        logical = [original_table[row, :nb].tolist().index(p) for p in kept_physical]
        assert logical[0] == 0 and logical[-2:] == [nb - 2, nb - 1] and logical == sorted(logical)
        # the same attention computed directly over those logical blocks of the row
        keys = paged.key_cache[original_table[row, :nb].long()].permute(2, 0, 1, 3)
        values = paged.value_cache[original_table[row, :nb].long()].permute(2, 0, 1, 3)
        selection = torch.tensor(logical).expand(H, -1)
        t = int(metadata.query_start_loc[row])
        expected = rm.sparse_decode_attention(query[t], keys, values, seq_lens[row], selection, D**-0.5)
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-5)


def test_vllm_mode_stride_state_and_fresh_block_summaries() -> None:
    from ucm.sparse.block_retrieval import BlockRetrievalMeta, BlockRetrievalSparse

    sparse = create_sparse(
        {"name": "block_retrieval", "keep_ratio": 0.25, "min_blocks": 4, "retrieval_stride": 3}, "worker"
    )
    assert isinstance(sparse, BlockRetrievalSparse)
    scorings = []
    kv_cache = None
    for step in range(5):  # the row decodes 5 tokens, all inside its last block
        kv, metadata, query = build_batch([40 * BS + 2 + step], [1])
        kv_cache = kv if kv_cache is None else kv_cache  # same seed and shape: one cache throughout
        sparse.execute_begin(None)
        run_wrapped(kv_cache, metadata, query, [])
        sparse.execute_finished()
        last_physical = int(metadata.block_table[0, 40])
        scorings.append(sparse._states[(LAYER, last_physical)].scorings)
    assert scorings == [1, 1, 1, 2, 2]  # re-scored every retrieval_stride=3 steps
    # a block whose content changed without passing through attention (a connector load) is
    # re-summarised once the scheduler reports it fresh
    assert kv_cache is not None
    physical = int(metadata.block_table[0, 7])
    kv_cache[physical, :, :, :D] = 9.0
    centres = sparse._summaries[LAYER].data.centres  # "mass": k-means centres of each block's keys (decoded)
    assert float(centres[:, physical].max()) < 9.0
    sparse.execute_begin(BlockRetrievalMeta(fresh_blocks=(physical,)))
    run_wrapped(kv_cache, metadata, query, [])
    centres = sparse._summaries[LAYER].data.centres  # decoded anew from the refreshed int8 codes
    assert float(centres[:, physical].min()) == 9.0 == float(centres[:, physical].max())


def test_layer_kv_views_the_vllm_bhnc_cache_without_copy() -> None:
    kv_cache = torch.randn(6, H, BS, 2 * D)  # vLLM 0.32: [blocks, kv heads, block_size, K | V]
    paged = LayerKV.from_layer_cache(kv_cache, vllm_patch_layout(), D)
    assert paged.key_cache.shape == (6, BS, H, D) and paged.block_size == BS
    torch.testing.assert_close(paged.key_cache[4, 3, 1], kv_cache[4, 1, 3, :D])
    torch.testing.assert_close(paged.value_cache[4, 3, 1], kv_cache[4, 1, 3, D:])
    kv_cache[2, 0, 5, 0] = 123.0  # a view: writes by the kernel are seen
    assert float(paged.key_cache[2, 5, 0, 0]) == 123.0


@pytest.mark.parametrize("impl_attrs", [{"alibi_slopes": torch.ones(HQ)}, {"sliding_window": (127, 0)}])
def test_position_dependent_attention_stays_dense(impl_attrs: dict[str, Any]) -> None:
    create_sparse({"name": "block_retrieval", "keep_ratio": 0.25, "min_blocks": 4}, "worker")
    kv_cache, metadata, query = build_batch([40 * BS], [1])
    seen: list[Any] = []

    def kernel(self: Any, layer: Any, q: Any, k: Any, v: Any, cache: Any, md: Any, output: Any, **_: Any) -> Any:
        seen.append(md)
        return output

    wrapper = vllm_patch.make_attention_wrapper(kernel)
    impl = SimpleNamespace(head_size=D, sliding_window=(-1, -1), alibi_slopes=None)
    wrapper(impl, SimpleNamespace(layer_name=LAYER), query, None, None, kv_cache, metadata, torch.zeros_like(query))
    assert seen[-1] is not metadata  # plain attention: compacted
    for name, value in impl_attrs.items():
        setattr(impl, name, value)
    wrapper(impl, SimpleNamespace(layer_name=LAYER), query, None, None, kv_cache, metadata, torch.zeros_like(query))
    assert seen[-1] is metadata  # ALiBi / sliding window: dense


def test_position_dependent_attention_is_refused_while_blocks_are_offloaded() -> None:
    """Dense attention in an ALiBi or sliding-window layer would read GPU blocks that offload freed."""
    from ucm.sparse.block_retrieval import BlockRetrievalSparse
    from ucm.sparse.offload import OffloadError
    from ucm.sparse.vllm_offload import OffloadUpdate

    sparse = create_sparse({"name": "block_retrieval", "min_blocks": 4, "offload": True}, "worker")
    assert isinstance(sparse, BlockRetrievalSparse) and sparse.worker_offload is not None
    kv_cache, metadata, query = build_batch([40 * BS], [1])
    wrapper = vllm_patch.make_attention_wrapper(lambda *a, **k: None)
    impl = SimpleNamespace(head_size=D, sliding_window=(127, 0), alibi_slopes=None)
    wrapper(impl, SimpleNamespace(layer_name=LAYER), query, None, None, kv_cache, metadata, torch.zeros_like(query))
    sparse.worker_offload.apply([OffloadUpdate("r1", anchor=0, first=True)], [], {})  # r1 starts offloading
    with pytest.raises(OffloadError, match=f"layer {LAYER} uses ALiBi or a sliding window; turn offload off"):
        wrapper(impl, SimpleNamespace(layer_name=LAYER), query, None, None, kv_cache, metadata, torch.zeros_like(query))
