"""`make gpu-check`: the transfer path on a real GPU, with torch only (no vLLM), in a few minutes.

1. The transfer correctness tests (`tests/transfer`) with `UCM_TEST_DEVICE=cuda`: every layout's
   gather/scatter, layer-wise save/load batches through pinned host memory on side streams.
2. Overlap: a layer-wise save of a large batch on the side stream while the compute stream runs
   matmuls, against each alone (if the copy overlapped, the combined time is well below the sum).
3. `ucm bench transfer` on CUDA: gather/scatter GB/s against a device copy of the same bytes, and
   pinned D2H/H2D through the transfer path against torch's own pinned copy.

Exits non-zero, saying why, when CUDA is not available or any check fails.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import torch

from ucm.bench import transfer as transfer_bench
from ucm.bench.common import cuda_missing, synchronized_time
from ucm.transfer.buffers import HostBufferPool
from ucm.transfer.paged import CacheLayout, PagedKV
from ucm.transfer.staging import HeadGroup, SaveBatch
from ucm.transfer.synthetic import make_paged_cache

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_tests() -> int:
    tests = REPO / "tests" / "transfer"
    if not tests.is_dir():
        print(f"gpu-check: {tests} not found (run from a checkout of the repository)")
        return 1
    env = {**os.environ, "UCM_TEST_DEVICE": "cuda"}
    print(f"== transfer correctness tests on CUDA ({tests})", flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider"], env=env)


def overlap_check() -> dict[str, float]:
    """Seconds for compute alone, a layer-wise save alone, and both together."""
    device = torch.device("cuda")
    layers, kv_heads, head, block = 32, 8, 128, 16
    n = 256  # 256 blocks x 32 layers x 64 KiB = 512 MiB per save
    tensors = make_paged_cache(
        CacheLayout.BHNC, num_layers=layers, num_blocks=2 * n, block_size=block, num_heads=kv_heads,
        head_size=head, device=device,
    )
    paged = PagedKV(tensors, CacheLayout.BHNC, head)
    pool = HostBufferPool(4 << 30)
    groups = [HeadGroup(h, 1) for h in range(kv_heads)]
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def compute(layer: int) -> None:
        for _ in range(4):
            torch.matmul(a, a)

    def save(with_compute: bool, with_save: bool) -> float:
        start = synchronized_time(device)
        batch = SaveBatch(paged, list(range(0, 2 * n, 2)), groups, pool) if with_save else None
        for layer in range(layers):
            if with_compute:
                compute(layer)
            if batch is not None:
                batch.save_layer(layer)
        if batch is not None:
            batch.finish().release()
        return synchronized_time(device) - start

    save(True, True)  # warm-up: pinned buffers, kernels
    return {
        "compute_s": save(True, False),
        "save_s": save(False, True),
        "both_s": save(True, True),
        "save_bytes": float(n * paged.block_nbytes(kv_heads)),
    }


def main(argv: list[str] | None = None) -> int:
    missing = cuda_missing("gpu-check")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"gpu-check on {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    failures = 0
    if run_tests() != 0:
        failures += 1
        print("gpu-check: transfer correctness tests FAILED")
    print("== overlap of layer-wise save (side stream) with compute", flush=True)
    ov = overlap_check()
    hidden = (ov["compute_s"] + ov["save_s"] - ov["both_s"]) / max(ov["save_s"], 1e-9)
    print(
        f"compute alone {ov['compute_s'] * 1e3:.1f} ms, save alone {ov['save_s'] * 1e3:.1f} ms "
        f"({ov['save_bytes'] / ov['save_s'] / 1e9:.1f} GB/s), both {ov['both_s'] * 1e3:.1f} ms: "
        f"{hidden:.0%} of the save hidden behind compute"
    )
    print("== ucm bench transfer --device cuda", flush=True)
    parser = argparse.ArgumentParser()
    transfer_bench.register(parser)
    rc = transfer_bench.run(parser.parse_args(["--device", "cuda", "--batch-mib", "256", "--layers", "32"]))
    failures += rc != 0
    print(f"gpu-check: {'FAILED' if failures else 'passed'} in {time.perf_counter() - started:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
