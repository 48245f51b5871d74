"""Store footprint gauges: a worker under vLLM 0.32's real scheduler, against a real store, reports
its store's bytes/blocks/read-only through the connector stats, and UCMPromMetrics exports them
as vllm:ucm_store_* on a Prometheus registry (what the operator puts in the UCMCluster status)."""

from __future__ import annotations

import errno
import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")

import prometheus_client
from ucm_connector_harness import Engine, write_model_dir

from ucm.connector.stats import GAUGES, UCMPromMetrics, store_gauges
from ucm.store.base import StoreStats


def test_store_gauges_reach_prometheus_with_real_values(tmp_path: pathlib.Path) -> None:
    model_dir = write_model_dir(tmp_path / "model")
    engine = Engine(model_dir, tmp_path / "store")
    engine.add("first", [(i * 7) % 250 + 1 for i in range(69)])  # 4 full blocks
    engine.run_until_idle()
    engine.flush()
    engine.step()  # one more step so the refresh sees the finished dumps
    store = engine.worker.worker_side.store.stats()
    assert store.blocks > 0 and store.bytes > 0
    with_gauges = [s for s in engine.stats if s.get("store_blocks") is not None]
    last = with_gauges[-1]
    assert last["store_blocks"] == store.blocks and last["store_used_bytes"] == store.bytes
    # Only changes are shipped (an idle step sends nothing), and the counters still arrive beside them.
    assert len(with_gauges) == len({s["store_used_bytes"] for s in with_gauges})
    assert sum(s.get("saved_blocks", 0) for s in engine.stats) == 4  # the prompt's 4 full blocks
    assert last["store_read_only_errno"] == 0.0

    registry = prometheus_client.CollectorRegistry()

    def bound(cls: type) -> type:
        class Bound(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *a: object, **kw: object) -> None:
                super().__init__(*a, registry=registry, **kw)
        return Bound

    types = {prometheus_client.Gauge: bound(prometheus_client.Gauge),
             prometheus_client.Counter: bound(prometheus_client.Counter),
             prometheus_client.Histogram: bound(prometheus_client.Histogram)}
    prom = UCMPromMetrics(engine.config, types, ["engine"], {0: ["0"]})  # type: ignore[arg-type]
    prom.observe(last, 0)
    text = prometheus_client.generate_latest(registry).decode()
    for key in GAUGES:
        assert f'vllm:ucm_{key}{{engine="0"}}' in text
    assert f'vllm:ucm_store_blocks{{engine="0"}} {float(store.blocks)}' in text
    assert f'vllm:ucm_store_used_bytes{{engine="0"}} {float(store.bytes)}' in text
    assert 'vllm:ucm_store_read_only_errno{engine="0"} 0.0' in text
    # The API-server process's probe of the same store feeds vllm:ucm_store_unreachable_seconds.
    assert prom.probe is not None and prom.probe.path == engine.config.kv_transfer_config.kv_connector_extra_config[
        "store_path"]
    prom.probe.probe_once()
    assert 'vllm:ucm_store_unreachable_seconds{engine="0"} 0.0' in prometheus_client.generate_latest(registry).decode()


@pytest.mark.parametrize(("reason", "code"), [
    (None, 0),
    # the reason FileStore records on a real ENOSPC (tests/store/test_store_faults.py)
    ("ENOSPC: No space left on device writing /mnt/store/objects/ab/x.tmp", errno.ENOSPC),
    ("EROFS: Read-only file system writing /mnt/store/objects/ab/x.tmp", errno.EROFS),
    ("something else", errno.EIO),
])
def test_read_only_reason_becomes_its_errno(reason: str | None, code: int) -> None:
    assert store_gauges(StoreStats(read_only_reason=reason))["store_read_only_errno"] == code
