"""End to end through vLLM 0.32's real v1 Scheduler and the real UCMConnector (both roles): the
connector forwards the sparse hooks in the order vLLM drives it. The model is the connector
harness's deterministic stand-in (no GPU); everything between scheduler and hooks is real."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch

pytest.importorskip("vllm")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "connector"))

from ucm_connector_harness import LAYERS, Engine, write_model_dir

from ucm.sparse import (
    UcmSparseBase,
    register_sparse,
    shutdown_sparse,
    vllm_patch,
)


class RecordingSparse(UcmSparseBase):
    """Records every hook with its role; the dense defaults keep the connector's behaviour."""

    name = "recording_for_connector_tests"
    log: ClassVar[list[tuple[str, ...]]] = []

    def _rec(self, *event: str) -> None:
        self.log.append((self.role.value, *event))

    def request_begin(self, request: Any) -> None:
        self._rec("request_begin", request.request_id)

    def request_finished(self, request: Any) -> None:
        self._rec("request_finished", request.request_id)

    def build_sparse_meta(self, scheduler_output: Any) -> object:
        self._rec("build_sparse_meta")
        return {"step_tokens": dict(scheduler_output.num_scheduled_tokens)}

    def register_kv_caches(self, kv_caches: Any) -> None:
        self._rec("register_kv_caches", ",".join(kv_caches))

    def execute_begin(self, sparse_meta: object | None) -> None:
        assert isinstance(sparse_meta, dict)  # what build_sparse_meta made reached the worker
        self._rec("execute_begin", ",".join(sparse_meta["step_tokens"]))

    def layer_begin(self, layer_name: str) -> None:
        self._rec("layer_begin", layer_name)

    def layer_finished(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        self._rec("layer_finished", layer_name)

    def execute_finished(self) -> None:
        self._rec("execute_finished")


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    register_sparse(RecordingSparse.name, f"{__name__}:RecordingSparse")
    RecordingSparse.log.clear()
    shutdown_sparse()
    yield
    shutdown_sparse()
    vllm_patch.uninstall_attention_hooks()


def test_connector_forwards_hooks_in_vllm_order(tmp_path: pathlib.Path) -> None:
    engine = Engine(
        write_model_dir(tmp_path / "model"), tmp_path / "store",
        extra={"ucm_sparse_config": {"name": RecordingSparse.name}},
    )
    assert vllm_patch.is_patched(__import__("vllm.v1.attention.backends.triton_attn", fromlist=["x"]).TritonAttentionImpl)
    engine.add("r1", list(range(40)), max_tokens=3)
    engine.run_until_idle()
    log = RecordingSparse.log
    worker = [e[1:] for e in log if e[0] == "worker"]
    scheduler = [e[1:] for e in log if e[0] == "scheduler"]
    assert worker[0] == ("register_kv_caches", ",".join(LAYERS))
    per_step = [("execute_begin", "r1")]
    for name in LAYERS:
        per_step += [("layer_begin", name), ("layer_finished", name)]
    per_step.append(("execute_finished",))
    steps = (len(worker) - 1) // len(per_step)
    assert steps >= 3 and worker[1:] == per_step * steps  # prefill, then one step per decoded token
    assert scheduler[0] == ("request_begin", "r1")
    assert scheduler.count(("build_sparse_meta",)) == steps
    assert ("request_finished", "r1") in scheduler
    assert scheduler.index(("request_begin", "r1")) < scheduler.index(("build_sparse_meta",))


def test_block_retrieval_meta_from_real_scheduler_output(tmp_path: pathlib.Path) -> None:
    """`fresh_blocks` lists exactly the blocks vLLM's scheduler assigned in each step."""
    from ucm.sparse.block_retrieval import BlockRetrievalMeta

    engine = Engine(
        write_model_dir(tmp_path / "model"), tmp_path / "store",
        extra={"ucm_sparse_config": {"name": "block_retrieval"}},
    )
    engine.add("r1", list(range(40)), max_tokens=12)  # 40 prompt tokens: 3 blocks, a 4th while decoding
    engine.step()
    first = engine.metas[0].sparse_meta
    assert isinstance(first, BlockRetrievalMeta)
    blocks = engine.scheduler.kv_cache_manager.get_block_ids("r1")[0]
    assert first.fresh_blocks == tuple(sorted(blocks[:3]))
    seen_blocks = list(blocks)
    while engine.scheduler.has_unfinished_requests():
        engine.step()
        if "r1" in engine.scheduler.requests:
            now = engine.scheduler.kv_cache_manager.get_block_ids("r1")[0]
            seen_blocks += [b for b in now if b not in seen_blocks]
    assert len(seen_blocks) == 4
    later = [m.sparse_meta.fresh_blocks for m in engine.metas[1:] if m.sparse_meta.fresh_blocks]
    assert later == [(seen_blocks[3],)]  # the block allocated when decoding crossed 48 tokens
