"""Offload: a real FileStore holds every block; steps fetch exactly the selected non-resident ones."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ucm.sparse import retrieval_math as rm
from ucm.sparse.block_retrieval import BlockRetrievalConfig, DecodeLayer
from ucm.sparse.offload import OffloadError, ResidentBlocks
from ucm.store import FileStore

H, HQ, D, BS, NB = 2, 4, 16, 16, 40


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    s = FileStore(tmp_path / "store", salt=b"\x07" * 16, io_threads=2)
    yield s
    s.close()


def setup(store: FileStore, capacity: int, **cfg: object) -> tuple[DecodeLayer, DecodeLayer, ResidentBlocks]:
    torch.manual_seed(2)
    keys, values = torch.randn(NB * BS, H, D), torch.randn(NB * BS, H, D)
    config = BlockRetrievalConfig.from_dict({"keep_ratio": 0.25, "min_blocks": 4, **cfg})
    resident = ResidentBlocks(
        store, [os.urandom(16) for _ in range(NB)], layer_index=3, num_kv_heads=H, block_size=BS, head_dim=D,
        capacity=capacity,
    )
    kb, _ = rm.to_block_major(keys, BS)
    vb, _ = rm.to_block_major(values, BS)
    for b in range(NB):
        assert all(resident.offload(b, torch.stack([kb[:, b], vb[:, b]])).wait())
    args = {"num_kv_heads": H, "head_dim": D, "block_size": BS, "max_tokens": NB * BS, "scale": D**-0.5}
    on_device = DecodeLayer(config, **args)
    offloaded = DecodeLayer(config, **args, offload=resident)
    on_device.append(keys, values)
    offloaded.append(keys, values)
    return on_device, offloaded, resident


def test_fetches_exactly_selected_non_resident_and_stays_bounded(store: FileStore) -> None:
    keep = rm.num_blocks_to_keep(NB, 0.25, 1, 2)
    capacity = H * keep + 3
    on_device, offloaded, resident = setup(store, capacity, prefetch_blocks=0, retrieval_stride=1)
    assert store.stats().dumps == NB * H
    for _ in range(8):
        q = torch.randn(HQ, D)
        before = set(resident.resident_pairs())
        loads_before = store.stats().loads
        out_ref, _ = on_device.step(q)
        out, report = offloaded.step(q)
        wanted = {(h, b) for h in range(H) for b in report.selection[h].tolist()}
        fetched = wanted - before
        assert report.fetched_bytes == len(fetched) * resident.layout.nbytes
        assert store.stats().loads - loads_before == len(fetched)  # nothing else was read
        assert wanted <= set(resident.resident_pairs())
        assert len(resident.resident_pairs()) <= capacity
        torch.testing.assert_close(out, out_ref)
    assert resident.stats.evictions > 0  # the budget was actually binding


def test_prefetch_runners_up(store: FileStore) -> None:
    keep = rm.num_blocks_to_keep(NB, 0.25, 1, 2)
    _, offloaded, resident = setup(store, H * (keep + 2) + 4, prefetch_blocks=2, retrieval_stride=2)
    q = torch.randn(HQ, D)
    offloaded.step(q)
    assert resident.stats.prefetched_blocks == 2 * H
    runners = offloaded.state.prefetch_candidates()
    for _ in range(3):  # the same query: the runners-up are not selected, but they were loaded
        offloaded.step(q)
    resident.drain()
    assert set(runners) <= set(resident.resident_pairs())


def test_budget_too_small_is_a_clear_error(store: FileStore) -> None:
    _, offloaded, _ = setup(store, 4, prefetch_blocks=0)
    with pytest.raises(OffloadError, match="resident_blocks: all 4 slots are pinned"):
        offloaded.step(torch.randn(HQ, D))


def test_missing_block_is_an_error_not_garbage(store: FileStore) -> None:
    keep = rm.num_blocks_to_keep(NB, 0.25, 1, 2)
    _, offloaded, resident = setup(store, H * keep + 2, prefetch_blocks=0)
    store.remove([resident.key((0, b)) for b in range(NB)])
    with pytest.raises(OffloadError, match="missing from the store"):
        offloaded.step(torch.randn(HQ, D))
