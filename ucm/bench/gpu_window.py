"""`make gpu-check`, window part: ReRoPE over the GPU backends' paged layout (BHNC), torch only.

A sequence of `tokens` random q/k/v (GQA, bfloat16 and float32) is rotated with the model's RoPE,
scattered into a paged cache in vLLM 0.32's FlashAttention/Triton layout ([blocks, kv_heads,
block_size, K|V], a shuffled block table) and attended with `ucm.window.paged.paged_rerope`, as the
hook does inside vLLM. Checks: float32 on the device equals the pair-by-pair formula
(`reference_attention`, float64 on the CPU) on a subset of queries within 1e-4; bfloat16 keeps
cosine >= 0.999 against it; prompts inside the window equal plain causal attention (torch's SDPA).
Prints queries/s on the device next to dense SDPA over the same sequence.

Runs on CPU tensors too (`check(device="cpu")`: the tests do), exits 2 without CUDA, 1 on a failure.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from ucm.bench.common import cuda_missing, synchronized_time
from ucm.transfer.paged import KVLayout
from ucm.window.config import WindowConfig
from ucm.window.paged import paged_rerope
from ucm.window.rerope import reference_attention
from ucm.window.rope import RopeSpec

MAX_FP32_ERR = 1e-4
MIN_BF16_COSINE = 0.999


@dataclass
class Batch:
    """One request in a paged cache, as vLLM's attention metadata would describe it."""
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor


def paged_inputs(tokens: int, q_heads: int, kv_heads: int, block: int, dtype: torch.dtype, dev: torch.device,
                 rope: RopeSpec, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(tokens, h, rope.head_dim, generator=g) for h in (q_heads, kv_heads, kv_heads))
    pos = torch.arange(tokens)
    qr, kr = rope.rotate(q, pos), rope.rotate(k, pos)
    blocks = -(-tokens // block)
    table = torch.randperm(blocks + 3, generator=g)[:blocks]
    cache = torch.zeros(blocks + 3, kv_heads, block, 2, rope.head_dim)
    for t in range(tokens):
        cache[table[t // block], :, t % block, 0] = kr[t]
        cache[table[t // block], :, t % block, 1] = v[t]
    return (q, k, v, qr.to(dev, dtype), cache.view(blocks + 3, kv_heads, block, -1).to(dev, dtype), table.to(dev))


def check(device: str = "cuda", tokens: int = 4096, window: int = 1024) -> dict[str, Any]:
    dev = torch.device(device)
    rope = RopeSpec(theta=500000.0, head_dim=128)
    config = WindowConfig(window, leak=16.0, log_scale=True, trained_length=2048)
    result: dict[str, Any] = {"device": str(dev), "tokens": tokens, "window": window}
    sample = torch.arange(tokens - 64, tokens)  # the reference is pair by pair: check the last queries
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, qr, cache, table = paged_inputs(tokens, 8, 2, 16, dtype, dev, rope)
        batch = Batch(torch.tensor([0, tokens], device=dev), torch.tensor([tokens], device=dev), table[None])
        out = torch.zeros(tokens, 8 * rope.head_dim, device=dev, dtype=dtype)
        start = synchronized_time(dev)
        paged_rerope(qr, cache, KVLayout.BHNC, batch, [0], rope, config, 128 ** -0.5, out)
        result[f"{str(dtype).removeprefix('torch.')}_queries_per_s"] = tokens / (synchronized_time(dev) - start)
        outputs[dtype] = out.view(tokens, 8, -1)[sample].double().cpu()
    expected = _reference_rows(q, k, v, sample, rope, config)  # pair by pair: the sampled queries only
    result["fp32_max_err"] = float((outputs[torch.float32] - expected).abs().max())
    result["bf16_cosine"] = float(torch.nn.functional.cosine_similarity(
        outputs[torch.bfloat16].flatten(), expected.flatten(), dim=0))
    # inside the window: plain attention
    short = window
    q, k, v, qr, cache, table = paged_inputs(short, 8, 2, 16, torch.float32, dev, rope, seed=1)
    batch = Batch(torch.tensor([0, short], device=dev), torch.tensor([short], device=dev), table[None])
    out = torch.zeros(short, 8 * rope.head_dim, device=dev)
    paged_rerope(qr, cache, KVLayout.BHNC, batch, [0], rope, config, 128 ** -0.5, out)
    kr = rope.rotate(k, torch.arange(short)).to(dev)
    plain = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(0, 1), kr.repeat_interleave(4, 1).transpose(0, 1), v.to(dev).repeat_interleave(4, 1).transpose(0, 1),
        is_causal=True, scale=128 ** -0.5).transpose(0, 1).reshape(short, -1)
    result["inside_window_max_err"] = float((out - plain).abs().max())
    dq, dk, dv = (torch.randn(1, 8, tokens, 128, device=dev) for _ in range(3))
    start = synchronized_time(dev)
    dense = torch.nn.functional.scaled_dot_product_attention(dq, dk, dv, is_causal=True)
    del dense
    result["dense_sdpa_queries_per_s"] = tokens / (synchronized_time(dev) - start)
    result["ok"] = (result["fp32_max_err"] < MAX_FP32_ERR and result["bf16_cosine"] >= MIN_BF16_COSINE
                    and result["inside_window_max_err"] < MAX_FP32_ERR)
    return result


def _reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, rope: RopeSpec,
                    config: WindowConfig) -> torch.Tensor:
    """The formula for the queries at `rows` only (each attends to keys 0..its position)."""
    out = []
    for i in rows.tolist():
        one = reference_attention(q[i:i + 1], k[: i + 1], v[: i + 1], torch.tensor([i]), rope, config, 128 ** -0.5)
        out.append(one[0])
    return torch.stack(out).double()


def main() -> int:
    missing = cuda_missing("window gpu-check")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"== ReRoPE over the BHNC paged layout on {torch.cuda.get_device_name()}", flush=True)
    result = check("cuda", tokens=32768, window=4096)
    print(json.dumps(result, sort_keys=True), flush=True)
    print(f"window gpu-check: {'passed' if result['ok'] else 'FAILED'} in {time.perf_counter() - started:.0f}s")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
