"""The hook framework: registry by name, config validation, one algorithm per process role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ucm.sparse import (
    SparseConfigError,
    SparseRole,
    UcmSparseBase,
    create_sparse,
    get_active_sparse,
    register_sparse,
    registered_names,
    shutdown_sparse,
)
from ucm.sparse.block_retrieval import BlockRetrievalConfig, BlockRetrievalMeta, BlockRetrievalSparse


class OtherSparse(UcmSparseBase):
    name = "other_for_tests"


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    shutdown_sparse()
    yield
    shutdown_sparse()


def test_create_by_name_and_active_per_role() -> None:
    s = create_sparse({"name": "block_retrieval", "keep_ratio": 0.1}, "scheduler")
    assert isinstance(s, BlockRetrievalSparse) and s.role is SparseRole.SCHEDULER
    assert isinstance(s.config, BlockRetrievalConfig) and s.config.keep_ratio == 0.1
    assert get_active_sparse("scheduler") is s and get_active_sparse("worker") is None
    w = create_sparse({"name": "block_retrieval"}, SparseRole.WORKER)
    assert get_active_sparse("worker") is w and get_active_sparse("scheduler") is s
    # same algorithm again replaces (a connector re-created in one process)
    s2 = create_sparse({"name": "block_retrieval"}, "scheduler")
    assert get_active_sparse("scheduler") is s2


def test_vllm_role_enum_by_name() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    assert SparseRole.parse(KVConnectorRole.WORKER) is SparseRole.WORKER
    assert SparseRole.parse(KVConnectorRole.SCHEDULER) is SparseRole.SCHEDULER
    with pytest.raises(SparseConfigError, match="scheduler' or 'worker'"):
        SparseRole.parse("decoder")


def test_one_algorithm_per_process() -> None:
    register_sparse("other_for_tests", f"{__name__}:OtherSparse")
    assert "other_for_tests" in registered_names()
    create_sparse({"name": "block_retrieval"}, "worker")
    with pytest.raises(SparseConfigError, match="already active"):
        create_sparse({"name": "other_for_tests"}, "worker")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({}, r"ucm_sparse_config\.name: required"),
        ({"name": "nope"}, r"ucm_sparse_config\.name: unknown sparse algorithm 'nope'; accepted: .*block_retrieval"),
        ({"name": "block_retrieval", "keep_ratio": 0}, r"ucm_sparse_config\.keep_ratio"),
        ({"name": "block_retrieval", "keep_ratio": 1.5}, r"ucm_sparse_config\.keep_ratio"),
        ({"name": "block_retrieval", "keep_ratio": "0.2"}, r"ucm_sparse_config\.keep_ratio"),
        ({"name": "block_retrieval", "init_blocks": -1}, r"ucm_sparse_config\.init_blocks"),
        ({"name": "block_retrieval", "local_blocks": 0}, r"ucm_sparse_config\.local_blocks"),
        ({"name": "block_retrieval", "retrieval_stride": 0}, r"ucm_sparse_config\.retrieval_stride"),
        ({"name": "block_retrieval", "retrieval_stride": True}, r"ucm_sparse_config\.retrieval_stride"),
        ({"name": "block_retrieval", "summary": "max"}, r"ucm_sparse_config\.summary: expected one of"),
        ({"name": "block_retrieval", "resident_blocks": 0}, r"ucm_sparse_config\.resident_blocks"),
        ({"name": "block_retrieval", "keep_ratoi": 0.2}, r"ucm_sparse_config\.keep_ratoi: unknown key"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], match: str) -> None:
    with pytest.raises(SparseConfigError, match=match):
        create_sparse(config, "worker")
    assert get_active_sparse("worker") is None  # nothing half-created


def test_not_a_mapping() -> None:
    with pytest.raises(SparseConfigError, match="ucm_sparse_config: expected an object"):
        create_sparse(["block_retrieval"], "worker")  # type: ignore[arg-type]


def test_dense_defaults_of_the_base() -> None:
    base = OtherSparse({}, SparseRole.WORKER)
    meta = object()
    assert base.attention_begin("l0", None, None, meta) is meta  # type: ignore[arg-type]
    assert base.estimate_num_slots(None, 100) == 100
    assert base.allocate_slots("r", 5).resident_blocks == (0, 1, 2, 3, 4)
    assert base.build_sparse_meta(None) is None


def test_scheduler_hooks_of_block_retrieval() -> None:
    s = create_sparse(
        {"name": "block_retrieval", "keep_ratio": 0.25, "init_blocks": 1, "local_blocks": 2, "min_blocks": 8},
        "scheduler",
    )
    assert isinstance(s, BlockRetrievalSparse)

    class Req:
        request_id = "r1"

    s.request_begin(Req())
    assert s.requests == {"r1"}
    # 64 blocks of 16 tokens: 16 kept + 2 prefetch slots
    assert s.estimate_num_slots(Req(), 64 * 16) == (16 + 2) * 16
    assert s.estimate_num_slots(Req(), 4 * 16) == 64  # short contexts stay dense
    assert s.allocate_slots("r1", 64).resident_blocks == (0, 62, 63)

    class NewReq:
        block_ids = ([7, 3],)

    class Cached:
        new_block_ids = [([9],), None]

    class Out:
        scheduled_new_reqs = [NewReq()]
        scheduled_cached_reqs = Cached()

    assert s.build_sparse_meta(Out()) == BlockRetrievalMeta((3, 7, 9))
    s.request_finished(Req())
    assert s.requests == set()
