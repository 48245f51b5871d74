"""With `ucm_sparse_config` set, the connector creates the algorithm through `ucm.sparse.create_sparse`
and forwards every hook at the right point of vLLM's step (real Scheduler, real worker connector).
The algorithm here is a recording subclass of the real `UcmSparseBase`: the test is about the
connector's forwarding, not about any algorithm."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")

from ucm_connector_harness import LAYERS, Engine, write_model_dir

from ucm.sparse.base import UcmSparseBase
from ucm.sparse.registry import get_active_sparse, register_sparse, shutdown_sparse

CALLS: list[tuple[str, str, Any]] = []


class RecordingSparse(UcmSparseBase):
    name = "ucm-test-recorder"

    def _log(self, hook: str, arg: Any = None) -> None:
        CALLS.append((self.role.value, hook, arg))

    def request_begin(self, request: Any) -> None:
        self._log("request_begin", request.request_id)

    def request_finished(self, request: Any) -> None:
        self._log("request_finished", request.request_id)

    def build_sparse_meta(self, scheduler_output: Any) -> object | None:
        meta = ("meta", tuple(sorted(scheduler_output.num_scheduled_tokens)))
        self._log("build_sparse_meta", meta)
        return meta

    def register_kv_caches(self, kv_caches: Any) -> None:
        self._log("register_kv_caches", tuple(kv_caches))

    def execute_begin(self, sparse_meta: object | None) -> None:
        self._log("execute_begin", sparse_meta)

    def layer_begin(self, layer_name: str) -> None:
        self._log("layer_begin", layer_name)

    def layer_finished(self, layer_name: str, kv_layer: Any) -> None:
        self._log("layer_finished", layer_name)

    def execute_finished(self) -> None:
        self._log("execute_finished")


def test_sparse_hooks_are_forwarded(tmp_path: pathlib.Path) -> None:
    register_sparse(RecordingSparse.name, f"{__name__}:RecordingSparse")
    CALLS.clear()
    try:
        engine = Engine(write_model_dir(tmp_path / "m"), tmp_path / "s",
                        extra={"ucm_sparse_config": {"name": RecordingSparse.name}})
        assert isinstance(get_active_sparse("scheduler"), RecordingSparse)
        assert isinstance(get_active_sparse("worker"), RecordingSparse)
        engine.add("r", list(range(1, 40)), max_tokens=1)
        engine.run_until_idle()
    finally:
        shutdown_sparse()
    sched = [(hook, arg) for role, hook, arg in CALLS if role == "scheduler"]
    worker = [(hook, arg) for role, hook, arg in CALLS if role == "worker"]
    assert sched[0] == ("request_begin", "r")
    assert ("build_sparse_meta", ("meta", ("r",))) in sched
    assert sched[-1] == ("request_finished", "r")
    assert worker[0] == ("register_kv_caches", tuple(LAYERS))
    step = worker[1 : 2 + 2 * len(LAYERS) + 1]
    assert step[0] == ("execute_begin", ("meta", ("r",)))  # the scheduler's sparse_meta reached the worker
    assert step[1:-1] == [x for name in LAYERS for x in (("layer_begin", name), ("layer_finished", name))]
    assert step[-1] == ("execute_finished", None)
