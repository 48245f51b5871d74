"""`ucm bench sparse --serving`: what it computes from the rows it measured (the servers themselves
run in `make bench`-style runs and in e2e/test_sparse_serving.py, not here)."""

from __future__ import annotations

import argparse
import math

from ucm.bench import sparse_serving as ss
from ucm.bench.sparse_admission import HELD
from ucm.sparse.vllm_offload import OFFLOAD_ENDED_LOG


def row(name: str, tokens: list[list[int]], tops: list[list[dict[str, float]]]) -> ss.Row:
    r = ss.Row(name, None)
    r.continuations = [{"tokens": t, "top": p} for t, p in zip(tokens, tops, strict=True)]
    r.decode_tokens_per_s = [10.0]
    return r


def test_quality_counts_the_shared_prefix_and_compares_distributions_only_there() -> None:
    same, other = {"a": -0.1, "b": -2.5}, {"a": -2.5, "b": -0.1}
    dense = row("dense", [[1, 2, 3, 4], [5, 6]], [[same] * 4, [same] * 2])
    sparse = row("sparse", [[1, 2, 9, 4], [5, 6]], [[same, same, other, other], [same, same]])
    quality = ss.compare(sparse, dense)
    assert quality["tokens_equal_until_first_divergence"] == [2, 2]
    assert quality["token_agreement"] == 5 / 6  # position 3 agrees again, after the divergence
    # distributions compared at steps 0, 1 and the diverging step 2 of the first document, 0 and 1 of the second
    expected = ss.kl(same, other) / 5
    assert math.isclose(quality["kl_top20_same_prefix"], expected)
    assert ss.compare(dense, dense)["kl_top20_same_prefix"] == 0.0


def test_held_blocks_are_read_from_the_schedulers_own_log_line() -> None:
    line = OFFLOAD_ENDED_LOG % ("cmpl-1", 11, 20, 34)
    match = HELD.search("INFO 2026-12-08 [ucm.sparse.vllm_offload] " + line)
    assert match is not None and match.groups() == ("cmpl-1", "11", "20", "34")


def test_report_names_each_row() -> None:
    args = argparse.Namespace(model="smollm2", docs=1, serving_tokens=4096, serving_decode=4, needle_depths=[0.5],
                              threads=2)
    dense = row("dense", [[1, 2, 3, 4]], [[{"a": -0.1}] * 4])
    sparse = row("sparse-0.25", [[1, 2, 3, 4]], [[{"a": -0.1}] * 4])
    sparse.held_blocks = [12]
    sparse.needles = [{"depth": 0.5, "number": "5237", "answer": "5237", "found": True}]
    table, result = ss.report(args, [dense, sparse])
    assert result["rows"]["sparse-0.25"]["kv_blocks_held"] == 12
    assert result["rows"]["dense"]["kv_blocks_held"] == result["rows"]["dense"]["kv_blocks_dense"] == 33
    assert result["rows"]["sparse-0.25"]["needles_found"] == 1
    assert "sparse-0.25" in table and "dense" in table
