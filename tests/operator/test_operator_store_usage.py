"""store_usage without a cluster: parsing workers' /metrics texts and the StoreHealthy rules.

The texts are the shape vLLM's /metrics gives (per-engine children with engine and model_name
labels); tests/connector/test_connector_store_gauges.py checks that the connector really exports
these names."""

from __future__ import annotations

import errno

import pytest
from ucm_operator.store_usage import Window, compute_store_usage, parse_pod


def text(used: float = 0, blocks: float = 0, cap: float | None = None, ro: int = 0, unreachable: float = 0,
         lookup: float = 0, hit: float = 0, evictions: float = 0, engines: int = 1) -> str:
    lines = ["# HELP vllm:ucm_store_used_bytes UCM store: used bytes (latest).",
             "# TYPE vllm:ucm_store_used_bytes gauge"]
    for engine in range(engines):
        labels = f'{{engine="{engine}",model_name="m"}}'
        lines += [
            f"vllm:ucm_store_used_bytes{labels} {used}",
            f"vllm:ucm_store_blocks{labels} {blocks}",
            f"vllm:ucm_store_evictions{labels} {evictions}",
            f"vllm:ucm_lookup_tokens_total{labels} {lookup}",
            f"vllm:ucm_hit_tokens_total{labels} {hit}",
            f"vllm:ucm_store_capacity_bytes{labels} {cap or 0}",
            f"vllm:ucm_store_read_only_errno{labels} {float(ro)}",
            f"vllm:ucm_store_unreachable_seconds{labels} {unreachable}",
        ]
    return "\n".join(lines) + "\n"


def test_parse_reads_gauges_and_counters() -> None:
    s = parse_pod("p0", text(used=2048, blocks=1, cap=4096, lookup=64, hit=16, evictions=3))
    assert (s.used_bytes, s.blocks, s.capacity_bytes, s.lookup_tokens, s.hit_tokens, s.evictions) == (
        2048, 1, 4096, 64, 16, 3)
    assert s.read_only_errno == 0 and s.unreachable_seconds == 0


def test_engines_of_one_pod_share_the_store_but_add_their_lookups() -> None:
    s = parse_pod("p0", text(used=2048, blocks=4, lookup=64, hit=16, engines=2))
    assert (s.used_bytes, s.blocks) == (2048, 4)  # one store, not two
    assert (s.lookup_tokens, s.hit_tokens) == (128, 32)


def test_parse_without_store_gauges_names_pod_and_metric() -> None:
    with pytest.raises(ValueError, match=r"pod p0: no vllm:ucm_store_used_bytes sample in its /metrics"):
        parse_pod("p0", "vllm:ucm_hit_tokens_total 3\n")


def test_parse_bad_value_names_the_metric() -> None:
    with pytest.raises(ValueError, match=r"pod p1: vllm:ucm_store_blocks has a non-numeric value 'x'"):
        parse_pod("p1", text().replace('vllm:ucm_store_blocks{engine="0",model_name="m"} 0', "vllm:ucm_store_blocks x"))


def test_usage_and_hit_rate_over_the_window_only() -> None:
    first = {"a": parse_pod("a", text(used=100, blocks=2, cap=1000, lookup=1000, hit=900))}
    usage, cond, window = compute_store_usage(first, {}, Window(), expected_pods=1)
    assert usage == {"usedBytes": 100, "blocks": 2, "evictions": 0, "capacityBytes": 1000,
                     "usedPercent": "10.0%", "lookupTokens": 0, "reportingPods": 1}  # no previous sample: no rate
    assert cond["status"] == "True" and cond["reason"] == "Writable"
    second = {"a": parse_pod("a", text(used=300, blocks=6, cap=1000, lookup=1100, hit=925)),
              "b": parse_pod("b", text(used=250, blocks=5, cap=1000, lookup=50, hit=50, evictions=4))}
    usage, cond, window = compute_store_usage(second, {}, window, expected_pods=2)
    # a: 25 of 100 new lookups hit; b has no previous sample, so it is not in this window yet.
    assert usage["hitRate"] == "25.0%" and usage["lookupTokens"] == 100
    assert usage["usedBytes"] == 300 and usage["blocks"] == 6 and usage["evictions"] == 4
    assert usage["usedPercent"] == "30.0%"
    third = {"a": parse_pod("a", text(lookup=10, hit=10)), "b": parse_pod("b", text(lookup=150, hit=50))}
    usage, _, window = compute_store_usage(third, {}, window, expected_pods=2)
    # a restarted (counter went down: counts from 0, 10/10), b 0 of 100.
    assert usage["hitRate"] == f"{100 * 10 / 110:.1f}%"
    usage, _, _ = compute_store_usage(third, {}, window, expected_pods=2)
    assert "hitRate" not in usage and usage["lookupTokens"] == 0  # nothing looked up: no rate, not 0%


def test_no_capacity_means_no_used_percent() -> None:
    usage, _, _ = compute_store_usage({"a": parse_pod("a", text(used=5, cap=None))}, {}, Window(), expected_pods=1)
    assert "capacityBytes" not in usage and "usedPercent" not in usage


def test_read_only_pod_makes_store_unhealthy_with_its_errno() -> None:
    samples = {"a": parse_pod("a", text()), "b": parse_pod("b", text(ro=errno.ENOSPC))}
    _, cond, _ = compute_store_usage(samples, {}, Window(), expected_pods=2)
    assert cond["status"] == "False" and cond["reason"] == "ReadOnly"
    assert "b (ENOSPC)" in cond["message"] and "a (" not in cond["message"]


def test_a_pod_that_cannot_reach_the_store_makes_it_unhealthy() -> None:
    samples = {"a": parse_pod("a", text(unreachable=12.5)), "b": parse_pod("b", text())}
    _, cond, _ = compute_store_usage(samples, {}, Window(), expected_pods=2)
    assert (cond["status"], cond["reason"]) == ("False", "Unreachable") and cond["message"].endswith("in a")


def test_unread_metrics_and_no_workers_are_unknown_not_unhealthy() -> None:
    usage, cond, _ = compute_store_usage({}, {"a": "timed out"}, Window(), expected_pods=1)
    assert (cond["status"], cond["reason"]) == ("Unknown", "MetricsUnavailable") and "a: timed out" in cond["message"]
    assert usage == {"message": "1 of 1 worker pod(s) unread; a: timed out"}
    _, cond, _ = compute_store_usage({}, {}, Window(), expected_pods=0)
    assert (cond["status"], cond["reason"]) == ("Unknown", "NoWorkers")
    usage, cond, _ = compute_store_usage({"a": parse_pod("a", text())}, {"b": "refused"}, Window(), expected_pods=2)
    assert cond["status"] == "True" and usage["message"] == "1 of 2 worker pod(s) unread; b: refused"


def test_a_worker_that_has_not_reported_yet_is_not_an_empty_store() -> None:
    # vLLM's /metrics before the first step: the connector's counters at 0, no store gauges yet.
    fresh = 'vllm:ucm_lookup_tokens_total{engine="0",model_name="m"} 0.0\nvllm:ucm_hit_tokens_total{engine="0",model_name="m"} 0.0\n'
    assert parse_pod("a", fresh) is None
    usage, cond, _ = compute_store_usage({"a": None}, {}, Window(), expected_pods=1)
    assert usage == {} and (cond["status"], cond["reason"]) == ("Unknown", "NotReported") and "a answered" in cond["message"]
    usage, cond, _ = compute_store_usage({"a": None, "b": parse_pod("b", text(blocks=3))}, {}, Window(), expected_pods=2)
    assert usage["blocks"] == 3 and usage["reportingPods"] == 1 and cond["status"] == "True"
    # some gauges but not the others is a broken exporter, not "not yet"
    with pytest.raises(ValueError, match=r"pod c: no vllm:ucm_store_used_bytes"):
        parse_pod("c", fresh + 'vllm:ucm_store_blocks{engine="0"} 1.0\nvllm:ucm_store_read_only_errno{engine="0"} 0.0\n')
