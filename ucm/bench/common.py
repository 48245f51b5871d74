"""What every benchmark here needs to time and summarise: percentiles and device-synchronized time.

Standard library only at import (torch is imported by the callers that have tensors), so the
router benchmark, which runs without torch, shares it with the GPU benchmarks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: see synchronize
    import torch


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, linearly interpolated between the two nearest ranks
    (numpy's default); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def synchronize(device: torch.device) -> None:
    """Wait until `device` finished its queued work (CUDA kernels are asynchronous); no-op on CPU."""
    if device.type == "cuda":
        # function-level: this module stays importable without torch; a CUDA device means torch is loaded
        import torch

        torch.cuda.synchronize(device)


def synchronized_time(device: torch.device) -> float:
    """`time.perf_counter()` after `device` finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def cuda_missing(check: str) -> str | None:
    """Why `check` (a `make gpu-check` part) cannot run here, or None when CUDA is available."""
    import torch  # function-level: see synchronize

    if torch.cuda.is_available():
        return None
    return (f"{check}: CUDA is not available (torch.cuda.is_available() is False; torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")


def stream_completion(url: str, body: Mapping[str, Any], timeout_s: float) -> Iterator[tuple[float, dict[str, Any]]]:
    """(arrival time, choice) of every streamed chunk of an OpenAI `/v1/completions` request that
    carries tokens (`return_token_ids` in `body`); the benchmarks that time tokens share it."""
    import httpx  # function-level: the GPU checks import this module without an HTTP client

    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout_s) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("token_ids"):
                yield time.perf_counter(), choice
