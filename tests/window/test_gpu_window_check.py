"""`make gpu-check`'s window part, run on CPU tensors: the same checks, so its logic is tested here."""

from __future__ import annotations

from ucm.bench.gpu_window import check


def test_window_gpu_check_passes_on_cpu() -> None:
    result = check("cpu", tokens=1200, window=256)
    assert result["ok"], result
    assert result["fp32_max_err"] < 1e-4 and result["inside_window_max_err"] < 1e-4
