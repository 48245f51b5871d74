"""`ucm bench router` runs end to end and reports its fixed-interface JSON (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_router_reports_json_with_same_run_baselines() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ucm", "bench", "router", "--json", "--seconds", "0.3", "--concurrency", "1", "4",
         "--tokens", "4", "--token-delay-ms", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in (
        "added_p50_ms",
        "added_p99_ms",
        "added_token_p99_ms",
        "router_rps",
        "toy_proxy_rps",
        "direct_rps",
    ):
        assert isinstance(result[key], float | int), key
    assert result["router_rps"] > 0 and result["toy_proxy_rps"] > 0 and result["concurrency"] == 4
    assert set(result["latency"]) == {"1", "4"}
    assert set(result["latency"]["4"]) == {"direct", "router", "toy_proxy"}
    assert result["latency"]["4"]["router"]["streams"] > 0
