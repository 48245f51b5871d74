"""`ucm bench window`'s arithmetic: position buckets, the rows' configurations and the goals."""

from __future__ import annotations

from pathlib import Path

from ucm.bench.window import Row, Settings, report, row_configs
from ucm.window.config import WindowConfig


def settings(trained: int = 8, factor: int = 4) -> Settings:
    return Settings(model=Path("/m"), model_name="m", trained=trained, factor=factor, docs=1, rows=(),
                    work_dir=Path("/w"), keep=False, json=None)


def test_buckets_split_positions_by_trained_window() -> None:
    row = Row("r", "", losses=[[float(p) for p in range(1, 32)]])  # NLL == position (0 has none)
    assert row.buckets(8, 4) == [("0-4", 2.0), ("4-8", 5.5), ("8-16", 11.5), ("16-24", 19.5), ("24-32", 27.5)]


def test_rows_are_valid_configs_and_leak_keeps_distances_inside_training() -> None:
    configs = row_configs(settings(8192, 4), 1e5)
    assert list(configs) == ["plain-rope", "vllm-yarn", "rerope", "leaky-rerope"]
    for _, overrides, window in configs.values():
        assert overrides["max_position_embeddings"] >= 4 * 8192
        if window is not None:
            config = WindowConfig.parse(window)
            longest = config.window + (4 * 8192 - config.window) / (config.leak or float("inf"))
            assert longest <= 8192
    assert configs["vllm-yarn"][1]["rope_parameters"]["rope_type"] == "yarn"


def test_goals_compare_rerope_with_its_window_and_with_yarn() -> None:
    s = settings(8, 2)
    good = Row("rerope", "", losses=[[2.0] * 15], seconds=[1.0])
    yarn = Row("vllm-yarn", "", losses=[[2.0] * 7 + [3.0] * 8], seconds=[1.0])
    _, doc = report(s, [yarn, good], kv_bytes_per_token=10)
    assert [g["met"] for g in doc["goals"]] == [True, True]
    worse = Row("rerope", "", losses=[[2.0] * 7 + [2.2] * 8], seconds=[1.0])
    _, doc = report(s, [yarn, worse], kv_bytes_per_token=10)
    assert [g["met"] for g in doc["goals"]] == [False, True]
    assert "MISSED" in report(s, [yarn, worse], 10)[0]
