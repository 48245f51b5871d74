"""store_usage without a cluster: parsing workers' /metrics texts and the StoreHealthy rules."""

from __future__ import annotations

import pytest
from ucm_operator.store_usage import Window, compute_store_usage, parse_pod


def text(used: float = 0, blocks: float = 0, cap: float | None = None, ro: str | None = None,
         lookup: float = 0, hit: float = 0, evictions: float = 0) -> str:
    lines = [
        "# HELP vllm:ucm_store_used_bytes UCM store: bytes stored.",
        "# TYPE vllm:ucm_store_used_bytes gauge",
        f'vllm:ucm_store_used_bytes{{engine="0",model_name="m"}} {used}',
        f'vllm:ucm_store_blocks{{engine="0",model_name="m"}} {blocks}',
        f'vllm:ucm_store_evictions{{engine="0",model_name="m"}} {evictions}',
        f'vllm:ucm_lookup_tokens_total{{engine="0",model_name="m"}} {lookup}',
        f'vllm:ucm_hit_tokens_total{{engine="0",model_name="m"}} {hit}',
        f'vllm:ucm_store_capacity_bytes{{engine="0",model_name="m"}} {cap or 0}',
    ]
    if ro:
        lines.append(f'vllm:ucm_store_read_only{{engine="0",model_name="m",reason="{ro}"}} 1.0')
    else:
        lines.append('vllm:ucm_store_read_only{engine="0",model_name="m",reason=""} 0.0')
    return "\n".join(lines) + "\n"


def test_parse_reads_gauges_and_counters() -> None:
    s = parse_pod("p0", text(used=2048, blocks=1, cap=4096, lookup=64, hit=16, evictions=3))
    assert (s.used_bytes, s.blocks, s.capacity_bytes, s.lookup_tokens, s.hit_tokens, s.evictions) == (
        2048, 1, 4096, 64, 16, 3)
    assert s.read_only_reason is None


def test_parse_without_store_gauges_names_pod_and_metric() -> None:
    with pytest.raises(ValueError, match=r"pod p0: no vllm:ucm_store_used_bytes"):
        parse_pod("p0", "vllm:ucm_hit_tokens_total 3\n")


def test_parse_bad_value_names_the_metric() -> None:
    with pytest.raises(ValueError, match=r"pod p1: vllm:ucm_store_blocks has a non-numeric value"):
        parse_pod("p1", text().replace("vllm:ucm_store_blocks{engine=\"0\",model_name=\"m\"} 0", "vllm:ucm_store_blocks x"))


def test_usage_and_hit_rate_over_the_window_only() -> None:
    first = {"a": parse_pod("a", text(used=100, blocks=2, cap=1000, lookup=1000, hit=900))}
    usage, cond, window = compute_store_usage(first, {}, Window())
    assert usage == {"usedBytes": 100, "blocks": 2, "evictions": 0, "capacityBytes": 1000,
                     "usedPercent": 10.0, "reportingPods": 1}  # no previous sample: no hit rate
    assert cond["status"] == "True" and cond["reason"] == "Writable"
    second = {"a": parse_pod("a", text(used=300, blocks=6, cap=1000, lookup=1100, hit=925)),
              "b": parse_pod("b", text(used=250, blocks=5, cap=1000, lookup=50, hit=50, evictions=4))}
    usage, cond, window = compute_store_usage(second, {}, window)
    # a: 25 of 100 new lookups hit; b has no previous sample, so it is not in this window yet.
    assert usage["hitRate"] == 0.25
    assert usage["usedBytes"] == 300 and usage["blocks"] == 6 and usage["evictions"] == 4
    assert usage["usedPercent"] == 30.0
    third = {"a": parse_pod("a", text(lookup=10, hit=10)), "b": parse_pod("b", text(lookup=150, hit=50))}
    usage, _, _ = compute_store_usage(third, {}, window)
    # a restarted (counter went down: counts from 0, 10/10), b 0 of 100.
    assert usage["hitRate"] == round(10 / 110, 4)


def test_no_capacity_means_no_used_percent() -> None:
    usage, _, _ = compute_store_usage({"a": parse_pod("a", text(used=5, cap=None))}, {}, Window())
    assert "capacityBytes" not in usage and "usedPercent" not in usage


def test_read_only_pod_makes_store_unhealthy_with_its_reason() -> None:
    samples = {"a": parse_pod("a", text()), "b": parse_pod("b", text(ro="ENOSPC: No space left on device"))}
    _, cond, _ = compute_store_usage(samples, {}, Window())
    assert cond["status"] == "False" and cond["reason"] == "ReadOnly"
    assert "b (ENOSPC: No space left on device)" in cond["message"]


def test_unreachable_and_no_workers() -> None:
    _, cond, _ = compute_store_usage({}, {"a": "timed out"}, Window())
    assert (cond["status"], cond["reason"]) == ("False", "Unreachable") and "a: timed out" in cond["message"]
    _, cond, _ = compute_store_usage({}, {}, Window())
    assert (cond["status"], cond["reason"]) == ("Unknown", "NoWorkers")
    _, cond, _ = compute_store_usage({"a": parse_pod("a", text())}, {"b": "refused"}, Window())
    assert cond["status"] == "True" and "1 pod(s) unread" in cond["message"]
