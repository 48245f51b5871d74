"""`ucm bench transfer`: throughput of the transfer path against a plain copy of the same bytes.

For each block size it builds a vLLM-0.32-style paged cache (one allocation, per-layer
``[B, H, N, K+V]`` views), picks random block ids, and times in the same run:

* `copy` - the baseline: `dst.copy_(src)` of one contiguous tensor of the batch's byte size;
* `gather` / `scatter` - `gather_blocks` / `scatter_blocks` of the batch (cache <-> block-major);
* `layerwise_save` - the connector's save path into per-head-group host payloads (on CUDA: per-layer
  gather + pinned D2H on a side stream + host repack, compared with torch's pinned D2H copy);
* on CUDA also `d2h` / `h2d`: gather/scatter through pinned host memory, against torch's own pinned
  `copy_` of the same bytes (`copy_d2h` / `copy_h2d`).

Medians of several repetitions; GB is 1e9 bytes. The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ucm.bench.common import synchronize
from ucm.transfer.buffers import HostBufferPool
from ucm.transfer.paged import CacheLayout, PagedKV, gather_blocks, scatter_blocks
from ucm.transfer.staging import HeadGroup, SaveBatch
from ucm.transfer.synthetic import make_paged_cache


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON summary line")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--batch-mib", type=int, default=64, help="bytes moved per batch (MiB)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--block-sizes", default="16,32,64,128")
    parser.set_defaults(func=run)


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so that the baseline and the measured
    operations see the same machine load (a shared CI machine's load changes by the second)."""
    for fn in fns.values():  # warm-up: allocations, first-touch page faults, cached row plans
        fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_block_size(args: argparse.Namespace, device: torch.device, block_size: int) -> dict[str, Any]:
    dtype = torch.bfloat16
    per_block = args.layers * 2 * block_size * args.kv_heads * args.head_size * dtype.itemsize
    n = max(1, (args.batch_mib << 20) // per_block)
    tensors = make_paged_cache(
        CacheLayout.BHNC, num_layers=args.layers, num_blocks=2 * n, block_size=block_size,
        num_heads=args.kv_heads, head_size=args.head_size, dtype=dtype, device=device,
    )
    paged = PagedKV(tensors, CacheLayout.BHNC, args.head_size)
    ids = torch.randperm(2 * n, generator=torch.Generator().manual_seed(1))[:n].to(device)
    nbytes = n * per_block
    out = torch.empty((n, *paged.payload_shape(args.kv_heads)), dtype=dtype, device=device)
    src_flat = torch.empty(nbytes // 2, dtype=dtype, device=device).normal_()
    dst_flat = torch.empty_like(src_flat)
    gb = nbytes / 1e9
    result: dict[str, Any] = {"block_size": block_size, "blocks": n, "batch_bytes": nbytes}

    pool = HostBufferPool(4 * nbytes + (64 << 20))
    groups = [HeadGroup(h, 1) for h in range(args.kv_heads)]
    id_list = ids.tolist()

    def layerwise_save() -> None:
        batch = SaveBatch(paged, id_list, groups, pool, layerwise=True)
        for layer in range(paged.num_layers):
            batch.save_layer(layer)
        batch.finish().release()

    on_cpu = device.type == "cpu"
    t = _interleaved(
        {
            "copy": lambda: dst_flat.copy_(src_flat),
            "gather": lambda: gather_blocks(paged, ids, 0, args.kv_heads, out),
            "scatter": lambda: scatter_blocks(paged, ids, 0, args.kv_heads, out),
            **({"layerwise_save": layerwise_save} if on_cpu else {}),
        },
        device,
        args.repeat,
    )
    result.update(
        copy_gbps=gb / t["copy"],
        gather_gbps=gb / t["gather"],
        scatter_gbps=gb / t["scatter"],
        gather_vs_copy=t["copy"] / t["gather"],
        scatter_vs_copy=t["copy"] / t["scatter"],
    )
    if on_cpu:  # on CUDA the save ends in host memory: compared with the pinned D2H copy below
        result.update(layerwise_save_gbps=gb / t["layerwise_save"], layerwise_save_vs_copy=t["copy"] / t["layerwise_save"])
    if device.type == "cuda":
        host = torch.empty(out.shape, dtype=dtype, pin_memory=True)
        host_flat = torch.empty(nbytes // 2, dtype=dtype, pin_memory=True)

        def d2h() -> None:
            gather_blocks(paged, ids, 0, args.kv_heads, out)
            host.copy_(out, non_blocking=True)

        def h2d() -> None:
            out.copy_(host, non_blocking=True)
            scatter_blocks(paged, ids, 0, args.kv_heads, out)

        t = _interleaved(
            {
                "copy_d2h": lambda: host_flat.copy_(src_flat, non_blocking=True),
                "d2h": d2h,
                "copy_h2d": lambda: src_flat.copy_(host_flat, non_blocking=True),
                "h2d": h2d,
                "layerwise_save": layerwise_save,
            },
            device,
            args.repeat,
        )
        t_copy_d2h, t_d2h, t_copy_h2d, t_h2d = t["copy_d2h"], t["d2h"], t["copy_h2d"], t["h2d"]
        result.update(
            layerwise_save_gbps=gb / t["layerwise_save"], layerwise_save_vs_copy=t_copy_d2h / t["layerwise_save"]
        )
        result.update(
            copy_d2h_gbps=gb / t_copy_d2h,
            copy_h2d_gbps=gb / t_copy_h2d,
            d2h_gbps=gb / t_d2h,
            h2d_gbps=gb / t_h2d,
            d2h_vs_copy=t_copy_d2h / t_d2h,
            h2d_vs_copy=t_copy_h2d / t_h2d,
        )
    return result


def run(args: argparse.Namespace) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but torch.cuda.is_available() is False")
            return 2
    sizes = [int(s) for s in args.block_sizes.split(",") if s]
    rows = [bench_block_size(args, device, bs) for bs in sizes]
    ratio_keys = [k for k in rows[0] if k.endswith("_vs_copy")]
    summary: dict[str, Any] = {
        "benchmark": "transfer",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "dtype": "bfloat16",
        "layers": args.layers,
        "kv_heads": args.kv_heads,
        "head_size": args.head_size,
        "rows": rows,
        "min_ratio_vs_copy": {k: min(r[k] for r in rows) for k in ratio_keys},
        "goal_ratio": 0.8,
    }
    if not args.json:
        cols = ["block_size", "blocks", "copy_gbps", "gather_gbps", "scatter_gbps", "layerwise_save_gbps"]
        if device.type == "cuda":
            cols += ["copy_d2h_gbps", "d2h_gbps", "copy_h2d_gbps", "h2d_gbps"]
        print("  ".join(f"{c:>14}" for c in cols))
        for r in rows:
            print("  ".join(f"{r[c]:>14.2f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    print(json.dumps(summary))
    return 0
