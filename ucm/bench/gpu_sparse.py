"""`make gpu-check`, sparse part: block retrieval on CUDA tensors, with torch only (no vLLM).

1. CUDA against CPU: the same planted 32K context decoded in float32 (TF32 off) on both devices,
   re-selecting every step. The selected (head, block) pairs must agree on >= 99% of picks (float
   reductions run in a different order on the GPU, so a near-tie may flip) and, on the steps whose
   selections agree exactly, the outputs must agree within 1e-3.
2. CUDA against dense attention on the same device: a planted 128K context in bfloat16 (8 KV heads,
   GQA 4): keep_ratio 1.0 must equal dense (max abs err < 2e-2), 25% must keep cosine >= 0.95;
   bytes read and synchronized time per step are printed next to dense's.

3. The vLLM path with offload on CUDA (`ucm.bench.sparse_vllm_offload`): every layer's attention
   hook over paged caches on the GPU, selected blocks read back from a FileStore into slots, freed
   blocks overwritten with NaN; outputs must equal the same selection without offload (< 1e-5) and
   the request must hold fewer GPU blocks.

All run on CPU tensors too (`device="cpu"`), which is how the tests check the logic on machines
without a GPU. Exits 2 when CUDA is unavailable, 1 when a check fails.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from ucm.bench.common import cuda_missing, synchronized_time
from ucm.bench.sparse_data import LayerQKV, PlantedContext, planted_context
from ucm.bench.sparse_vllm_offload import bench_vllm_offload
from ucm.sparse import retrieval_math as rm
from ucm.sparse.block_retrieval import BlockRetrievalConfig, DecodeLayer

MIN_SELECTION_AGREEMENT = 0.99
MAX_DEVICE_DIFF = 1e-3


def _decode(
    ctx: PlantedContext, ratio: float, stride: int, dtype: torch.dtype, dev: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, float]]:
    """Decode every planted query on `dev`: outputs, selections, and per-step cosine/bytes/time vs dense."""
    n, n_kv, head_dim = ctx.keys.shape
    scale = head_dim**-0.5
    config = BlockRetrievalConfig.from_dict({"keep_ratio": ratio, "retrieval_stride": stride})
    layer = DecodeLayer(config, num_kv_heads=n_kv, head_dim=head_dim, block_size=16, max_tokens=n,
                        scale=scale, dtype=dtype, device=dev)
    layer.append(ctx.keys.to(dev, dtype), ctx.values.to(dev, dtype))
    rm.dense_decode_attention(ctx.queries[0].to(dev, dtype), layer.keys, layer.values, n, scale)  # warm-up
    outs, sels, cos = [], [], []
    err, sparse_s, dense_s, sparse_b, dense_b = 0.0, 0.0, 0.0, 0, 0
    for query in ctx.queries.to(dev, dtype):
        t0 = synchronized_time(dev)
        out, report = layer.step(query)
        t1 = synchronized_time(dev)
        dense = rm.dense_decode_attention(query, layer.keys, layer.values, n, scale)
        t2 = synchronized_time(dev)
        sparse_s, dense_s = sparse_s + t1 - t0, dense_s + t2 - t1
        outs.append(out.float().cpu())
        sels.append(report.selection.cpu())
        cos.append(float(torch.nn.functional.cosine_similarity(out.float().flatten(), dense.flatten(), dim=0)))
        err = max(err, float((out.float() - dense).abs().max()))
        sparse_b += report.kv_bytes + report.summary_bytes
        dense_b += 2 * n * n_kv * head_dim * layer.keys.element_size()
    steps = len(outs)
    stats = {"cosine_min": round(min(cos), 5), "max_abs_err": round(err, 5),
             "bytes_reduction": round(dense_b / sparse_b, 2),
             "sparse_ms": round(1e3 * sparse_s / steps, 3), "dense_ms": round(1e3 * dense_s / steps, 3)}
    return outs, sels, stats


def compare_devices(tokens: int = 32768, device: str = "cuda", reference: str = "cpu") -> dict[str, Any]:
    """Block retrieval on `device` against the same run on `reference` (float32, re-selected every step)."""
    ctx = planted_context(tokens, num_kv_heads=4, group=4, block_size=16, steps=8, num_needles=64,
                          strength=(1.0, 4.0), seed=3)
    result: dict[str, Any] = {"tokens": tokens, "device": device, "reference": reference}
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: compare float32 with float32
    try:
        outs_d, sels_d, result["device_vs_dense"] = _decode(ctx, 0.25, 1, torch.float32, torch.device(device))
        outs_r, sels_r, result["reference_vs_dense"] = _decode(ctx, 0.25, 1, torch.float32, torch.device(reference))
    finally:
        torch.set_float32_matmul_precision(precision)
    picks = sum(s.numel() for s in sels_r)
    same = sum(len(set(a[h].tolist()) & set(b[h].tolist())) for a, b in zip(sels_d, sels_r, strict=True)
               for h in range(a.shape[0]))
    result["selection_agreement"] = round(same / picks, 5)
    agreeing = [i for i, (a, b) in enumerate(zip(sels_d, sels_r, strict=True)) if torch.equal(a, b)]
    result["steps_with_equal_selection"] = f"{len(agreeing)}/{len(sels_r)}"
    result["max_output_diff"] = max((float((outs_d[i] - outs_r[i]).abs().max()) for i in agreeing), default=0.0)
    result["ok"] = bool(agreeing) and result["selection_agreement"] >= MIN_SELECTION_AGREEMENT and (
        result["max_output_diff"] < MAX_DEVICE_DIFF)
    return result


def run_cuda_check(tokens: int = 131072, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> dict[str, Any]:
    """Block retrieval vs dense attention on one device: keep 1.0 equals dense, 25% keeps cosine >= 0.95."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run_cuda_check: CUDA is not available")
    ctx = planted_context(tokens, num_kv_heads=8, group=4, block_size=16, steps=8)
    report: dict[str, Any] = {"tokens": tokens, "dtype": str(dtype)}
    stride = BlockRetrievalConfig.retrieval_stride
    _, _, report["keep_1.0"] = _decode(ctx, 1.0, stride, dtype, dev)
    _, _, report["keep_0.25"] = _decode(ctx, 0.25, stride, dtype, dev)
    report["ok"] = report["keep_1.0"]["max_abs_err"] < 2e-2 and report["keep_0.25"]["cosine_min"] >= 0.95
    return report


def check_vllm_offload(device: str = "cuda", tokens: int = 4096, layers: int = 4) -> dict[str, Any]:
    """The vLLM-path hook with offload on `device` (random Q/K/V: the check is about equality)."""
    gen = torch.Generator().manual_seed(4)
    kv_heads, group, head_dim = 4, 4, 64
    qkv = [LayerQKV(i, torch.randn(tokens, kv_heads * group, head_dim, generator=gen),
                    torch.randn(tokens, kv_heads, head_dim, generator=gen),
                    torch.randn(tokens, kv_heads, head_dim, generator=gen)) for i in range(layers)]
    config = BlockRetrievalConfig.from_dict({"keep_ratio": 0.25, "offload": True})
    result = bench_vllm_offload(config, qkv, 16, decode_steps=16, device=device)
    diffs = [result[run]["max_abs_diff_vs_resident"] for run in ("prefetch", "no_prefetch")]
    result["ok"] = max(diffs) < 1e-5 and result["gpu_blocks_offload"] < result["gpu_blocks_resident"]
    return result


def main() -> int:
    missing = cuda_missing("sparse gpu-check")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"== sparse block retrieval on {torch.cuda.get_device_name()}: CUDA vs CPU (float32)", flush=True)
    devices = compare_devices()
    print(json.dumps(devices, sort_keys=True), flush=True)
    print("== sparse block retrieval vs dense on CUDA (bfloat16, 128K tokens)", flush=True)
    dense = run_cuda_check()
    print(json.dumps(dense, sort_keys=True), flush=True)
    print("== sparse vLLM-path hook with offload on CUDA (slots filled from a FileStore)", flush=True)
    offload = check_vllm_offload()
    print(json.dumps(offload, sort_keys=True), flush=True)
    failed = [name for name, r in (("cuda-vs-cpu", devices), ("vs-dense", dense), ("vllm-offload", offload))
              if not r["ok"]]
    print(f"sparse gpu-check: {'FAILED ' + ', '.join(failed) if failed else 'passed'} "
          f"in {time.perf_counter() - started:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
