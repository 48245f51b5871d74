"""Extra-config validation, plugin registration and the stats that reach vLLM's Prometheus metrics."""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")

from ucm.connector.config import ConfigError, parse_extra_config


def parse(**extra: object):  # type: ignore[no-untyped-def]
    return parse_extra_config({"store_path": "/mnt/ucm", **extra}, default_model_id="org/model")


def test_defaults_and_accepted_values() -> None:
    cfg = parse()
    assert (cfg.model_id, cfg.model_revision, cfg.load_mode, cfg.layerwise_save, cfg.durability) == (
        "org/model", "main", "sync", True, "none")
    assert cfg.max_tp_size == 8 and parse(max_tp_size=2).max_tp_size == 2
    cfg = parse(load_mode="async", durability="fsync", capacity_bytes=None, host_tier_bytes=1 << 30,
                io_threads=4, direct_io=True, cache_salt="tenant-a", ucm_sparse_config={"name": "x"})
    assert cfg.load_mode == "async" and cfg.host_tier_bytes == 1 << 30 and cfg.ucm_sparse_config == {"name": "x"}


@pytest.mark.parametrize(("extra", "message"), [
    ({"load_mode": "lazy"}, r"kv_connector_extra_config\.load_mode: expected one of 'sync', 'async', got 'lazy'"),
    ({"durability": "always"}, r"\.durability: expected one of 'none', 'fsync'"),
    ({"capacity_bytes": -1}, r"\.capacity_bytes: expected an integer >= 1 or null, got -1"),
    ({"host_tier_bytes": "1G"}, r"\.host_tier_bytes: expected an integer >= 0, got '1G'"),
    ({"layerwise_save": "yes"}, r"\.layerwise_save: expected true or false"),
    ({"io_threads": 0}, r"\.io_threads: expected an integer >= 1"),
    ({"model_id": "/models/llama"}, r"\.model_id: expected a model name .*not a local path"),
    ({"store_pth": "/x"}, r"unknown key\(s\) store_pth; accepted keys are .*store_path"),
    ({"ucm_sparse_config": [1]}, r"\.ucm_sparse_config: expected an object"),
    ({"max_tp_size": 3}, r"\.max_tp_size: expected one of 1, 2, 4, 8, got 3"),
    ({"max_tp_size": "2"}, r"\.max_tp_size: expected one of 1, 2, 4, 8, got '2'"),
    ({"max_tp_size": True}, r"\.max_tp_size: expected one of 1, 2, 4, 8, got True"),
])
def test_bad_values_name_the_key_and_what_is_accepted(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(**extra)


def test_store_path_is_required() -> None:
    with pytest.raises(ConfigError, match=r"store_path is required"):
        parse_extra_config({}, default_model_id="org/model")


def test_plugin_registers_the_connector_by_name(tmp_path: pathlib.Path) -> None:
    from ucm_connector_harness import make_vllm_config, write_model_dir
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_plugins_by_group

    from ucm.connector import UCMConnector
    from ucm.connector.plugin import register

    plugins = load_plugins_by_group("vllm.general_plugins")  # what vLLM runs at start-up
    assert plugins.get("ucm") is register, "the vllm.general_plugins entry point (pyproject) is not installed"
    plugins["ucm"]()
    register()  # idempotent: vLLM may load plugins in several places
    assert KVConnectorFactory.get_connector_class_by_name("UCMConnector") is UCMConnector
    config = make_vllm_config(write_model_dir(tmp_path / "m"), tmp_path / "store")
    assert config.kv_transfer_config is not None
    config.kv_transfer_config.kv_connector_module_path = None  # by name only, through the plugin
    assert KVConnectorFactory.get_connector_class(config.kv_transfer_config) is UCMConnector


def test_bad_extra_config_fails_connector_start_up(tmp_path: pathlib.Path) -> None:
    from ucm_connector_harness import kv_cache_config, make_vllm_config, write_model_dir
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from ucm.connector import UCMConnector

    config = make_vllm_config(write_model_dir(tmp_path / "m"), tmp_path / "s", extra={"load_mode": "eager"})
    with pytest.raises(ConfigError, match="load_mode"):
        UCMConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config(16, 8))


def test_stats_aggregate_reduce_and_reach_prometheus(tmp_path: pathlib.Path) -> None:
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram
    from ucm_connector_harness import make_vllm_config, write_model_dir

    from ucm.connector import UCMConnector
    from ucm.connector.stats import UCMConnectorStats

    worker = UCMConnectorStats()
    worker.add("loaded_bytes", 4_000_000_000)
    worker.add("load_seconds", 2.0)
    sched = UCMConnector.build_kv_connector_stats({"lookup_tokens": 100, "hit_tokens": 80})
    assert sched is not None
    total = worker.aggregate(sched)
    reduced = total.reduce()
    assert reduced["load_gbps"] == 2.0 and reduced["hit_rate"] == 0.8
    snapshot = worker.take()
    assert snapshot is not None and worker.is_empty() and worker.take() is None

    prom = UCMConnector.build_prom_metrics(
        make_vllm_config(write_model_dir(tmp_path / "m"), tmp_path / "s"),
        {Counter: Counter, Gauge: Gauge, Histogram: Histogram},
        ["model_name", "engine"], {0: ["ucm-test", "0"]},
    )
    assert prom is not None
    prom.observe(snapshot.data, 0)
    labels = {"model_name": "ucm-test", "engine": "0"}
    assert REGISTRY.get_sample_value("vllm:ucm_hit_tokens_total", labels) == 80
    assert REGISTRY.get_sample_value("vllm:ucm_loaded_bytes_total", labels) == 4e9
    assert REGISTRY.get_sample_value("vllm:ucm_load_gbps", labels) == 2.0


def test_pipeline_parallel_is_refused_with_a_clear_error(tmp_path: pathlib.Path) -> None:
    from ucm_connector_harness import kv_cache_config, make_vllm_config, write_model_dir
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from ucm.connector import UCMConnector

    config = make_vllm_config(write_model_dir(tmp_path / "m"), tmp_path / "s")
    config.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported"):
        UCMConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config(16, 8))


@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
def test_tp_size_above_max_tp_size_fails_start_up(tmp_path: pathlib.Path, role: str) -> None:
    """A TP 2 rank cannot serve blocks grouped for TP 1 (it would own half a stored group): both
    connector roles refuse to start, naming the key."""
    from ucm_connector_harness import kv_cache_config, make_vllm_config, write_model_dir
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from ucm.connector import UCMConnector

    config = make_vllm_config(write_model_dir(tmp_path / "m"), tmp_path / "s", extra={"max_tp_size": 1})
    config.parallel_config.tensor_parallel_size = 2
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 exceeds kv_connector_extra_config\.max_tp_size=1"):
        UCMConnector(config, KVConnectorRole[role], kv_cache_config(16, 8))
    config.kv_transfer_config.kv_connector_extra_config["max_tp_size"] = 2  # type: ignore[union-attr]
    UCMConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config(16, 8)).shutdown()
