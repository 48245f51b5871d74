"""Worker side of the connector against a real FileStore: every KV layout round-trips bit-exact into
different block ids, and blocks cross layouts and tensor-parallel sizes (TP 2 <-> TP 1, MLA)."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")

from ucm.connector.heads import canonical_group_size, plan_heads, supported_tp_sizes
from ucm.connector.layouts import detect_layout
from ucm.connector.metadata import LoadSpec, SaveSpec, UCMConnectorMetadata
from ucm.connector.worker import CacheSpec, UCMWorkerSide
from ucm.hashing import BlockHasher, CacheIdentity, KVGeometry, block_key
from ucm.store import StoreOptions, open_store
from ucm.transfer import CacheLayout, HostBufferPool
from ucm.transfer.synthetic import make_paged_cache

L, NB, BS, HEADS, D = 3, 10, 16, 4, 8


def identity(is_mla: bool = False) -> CacheIdentity:
    geo = KVGeometry(L, 1 if is_mla else HEADS, D, is_mla)
    return CacheIdentity("test/model", "main", "bfloat16", geo, BS)


def hashes(n: int, seed: int = 0, is_mla: bool = False) -> list[bytes]:
    return BlockHasher(identity(is_mla)).hash_blocks([seed + i for i in range(n * BS)])


class Rank:
    def __init__(self, store_dir: pathlib.Path, layout: CacheLayout, *, tp: int = 1, rank: int = 0,
                 physical: str = "LBHNC", seed: int = 0, layerwise: bool = True, staging: int = 64 << 20,
                 max_tp_size: int = 8) -> None:
        is_mla = layout.is_mla
        self.layout = layout
        self.heads = plan_heads(1 if is_mla else HEADS, tp, rank, is_mla=is_mla, max_tp_size=max_tp_size)
        tensors = make_paged_cache(
            layout, num_layers=L, num_blocks=NB, block_size=BS, num_heads=self.heads.local_count,
            head_size=D, physical=physical, seed=seed,
        )
        self.caches = {f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(tensors)}
        self.store = open_store(store_dir, StoreOptions(salt=identity(is_mla).digest()))
        self.worker = UCMWorkerSide(
            store=self.store, heads=self.heads, can_save=True, layerwise_save=layerwise,
            pool=HostBufferPool(staging, timeout=0.1),
        )
        spec = CacheSpec(NB, BS, self.heads.local_count, D, 0 if is_mla else D, is_mla)
        self.worker.register_kv_caches(self.caches, spec)

    def _step(self, meta: UCMConnectorMetadata) -> set[int]:
        w = self.worker
        w.bind(meta)
        w.start_load()
        for name, tensor in self.caches.items():
            w.wait_layer(name)
            w.save_layer(name, tensor)
        w.finish_step()
        w.flush()
        return w.take_load_errors()

    def save(self, block_ids: list[int], block_hashes: list[bytes]) -> None:
        assert self._step(UCMConnectorMetadata(saves=[SaveSpec("r", block_ids, block_hashes)])) == set()

    def load(self, block_ids: list[int], block_hashes: list[bytes]) -> set[int]:
        return self._step(UCMConnectorMetadata(loads=[LoadSpec("r", block_ids, block_hashes)]))

    def kv(self, block: int) -> torch.Tensor:
        """[layers, local heads, tokens, K/V, D] of one block, read with plain per-layout indexing."""
        out = []
        for t in self.caches.values():
            if self.layout is CacheLayout.BHNC:
                out.append(t[block].unflatten(-1, (2, D)))
            elif self.layout is CacheLayout.FLASH_ATTN:
                out.append(t[:, block].permute(2, 1, 0, 3))
            elif self.layout is CacheLayout.FLASHINFER:
                out.append(t[block].permute(2, 1, 0, 3))
            elif self.layout is CacheLayout.MLA:
                out.append(t[block].unsqueeze(-2))
            else:
                out.append(t[block][None, :, None, :])
        return torch.stack(out)


ROUND_TRIP = [
    (CacheLayout.BHNC, "LBHNC", True),
    (CacheLayout.BHNC, "LBNHC", False),
    (CacheLayout.BHNC, "BLNHC", True),
    (CacheLayout.FLASH_ATTN, "LBHNC", True),
    (CacheLayout.FLASHINFER, "LBHNC", False),
    (CacheLayout.MLA, "LBHNC", True),
    (CacheLayout.MLA_3D, "LBHNC", False),
]


@pytest.mark.parametrize(("layout", "physical", "layerwise"), ROUND_TRIP)
def test_round_trip_into_other_block_ids(tmp_path: pathlib.Path, layout: CacheLayout, physical: str, layerwise: bool) -> None:
    h = hashes(3, is_mla=layout.is_mla)
    src = Rank(tmp_path, layout, physical=physical, layerwise=layerwise)
    src.save([3, 5, 6], h)
    dst = Rank(tmp_path, layout, physical=physical, seed=7)
    before = {b: dst.kv(b).clone() for b in range(NB)}
    assert dst.load([0, 7, 2], h) == set()
    for s, d in zip([3, 5, 6], [0, 7, 2], strict=True):
        assert torch.equal(dst.kv(d), src.kv(s))
    for b in set(range(NB)) - {0, 7, 2}:
        assert torch.equal(dst.kv(b), before[b])


def test_tp2_producer_feeds_tp1_consumer_across_layouts(tmp_path: pathlib.Path) -> None:
    h = hashes(2, seed=100)
    producers = [Rank(tmp_path, CacheLayout.FLASHINFER, tp=2, rank=r, seed=r) for r in range(2)]
    for p in producers:
        p.save([4, 1], h)
    consumer = Rank(tmp_path, CacheLayout.BHNC, physical="LBNHC", seed=9)
    assert consumer.load([8, 3], h) == set()
    for s, d in zip([4, 1], [8, 3], strict=True):
        whole = torch.cat([p.kv(s) for p in producers], dim=1)  # heads 0-1 from rank 0, 2-3 from rank 1
        assert torch.equal(consumer.kv(d), whole)


def test_tp1_producer_feeds_tp2_consumer_ranks(tmp_path: pathlib.Path) -> None:
    h = hashes(2, seed=200)
    producer = Rank(tmp_path, CacheLayout.FLASH_ATTN, seed=3)
    producer.save([2, 9], h)
    for r in range(2):
        consumer = Rank(tmp_path, CacheLayout.BHNC, tp=2, rank=r, seed=11 + r)
        assert consumer.load([5, 6], h) == set()
        for s, d in zip([2, 9], [5, 6], strict=True):
            assert torch.equal(consumer.kv(d), producer.kv(s)[:, 2 * r : 2 * r + 2])


def test_max_tp_size_2_round_trips_tp2_to_tp1_and_tp1_to_tp2(tmp_path: pathlib.Path) -> None:
    """max_tp_size=2: 2-head objects (half as many, twice the size); TP 2 <-> TP 1 stay bit-exact."""
    h = hashes(2, seed=700)
    producers = [Rank(tmp_path, CacheLayout.FLASHINFER, tp=2, rank=r, seed=r, max_tp_size=2) for r in range(2)]
    assert [p.heads.groups() for p in producers] == [[(0, 2, 0)], [(2, 2, 0)]]
    for p in producers:
        p.save([4, 1], h)
    assert sum(p.store.stats().dumps for p in producers) == 2 * 2  # 2 blocks x 2 groups of 2 heads
    consumer = Rank(tmp_path, CacheLayout.BHNC, physical="LBNHC", seed=9, max_tp_size=2)
    assert consumer.heads.groups() == [(0, 2, 0), (2, 2, 2)]
    assert consumer.load([8, 3], h) == set()
    for s, d in zip([4, 1], [8, 3], strict=True):
        assert torch.equal(consumer.kv(d), torch.cat([p.kv(s) for p in producers], dim=1))
    h2 = hashes(2, seed=800)
    consumer.save([0, 5], h2)
    for r in range(2):
        reader = Rank(tmp_path, CacheLayout.FLASH_ATTN, tp=2, rank=r, seed=20 + r, max_tp_size=2)
        assert reader.load([6, 7], h2) == set()
        for s, d in zip([0, 5], [6, 7], strict=True):
            assert torch.equal(reader.kv(d), consumer.kv(s)[:, 2 * r : 2 * r + 2])


def test_blocks_grouped_for_another_max_tp_size_miss_and_are_never_scattered(tmp_path: pathlib.Path) -> None:
    """Keys encode the head range: a max_tp_size=8 (1-head groups) reader finds nothing of what a
    max_tp_size=2 (2-head groups) writer stored, in the scheduler's lookup and in the worker's load."""
    h = hashes(3, seed=900)
    writer = Rank(tmp_path, CacheLayout.BHNC, seed=1, max_tp_size=2)
    writer.save([1, 2, 3], h)
    reader = Rank(tmp_path, CacheLayout.BHNC, seed=2)  # default max_tp_size=8
    assert reader.heads.group_size == 1 and writer.heads.group_size == 2
    keys_8 = [block_key(b, head, 1) for b in h for head in range(HEADS)]
    keys_2 = [block_key(b, head, 2) for b in h for head in (0, 2)]
    assert not any(reader.store.lookup(keys_8)) and all(reader.store.lookup(keys_2))
    before = {b: reader.kv(b).clone() for b in range(NB)}
    assert reader.load([4, 5, 6], h) == {4, 5, 6}
    assert all(torch.equal(reader.kv(b), before[b]) for b in range(NB))


def test_max_tp_size_sets_the_group_and_refuses_larger_tp() -> None:
    assert [canonical_group_size(8, False, m) for m in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert canonical_group_size(6, False, 8) == 3 and canonical_group_size(6, False, 1) == 6
    assert supported_tp_sizes(8, False, 2) == [1, 2] and supported_tp_sizes(8, False, 4) == [1, 2, 4]
    assert supported_tp_sizes(8, False, 8)[-1] == 64  # the default keeps replicated-head TP sizes
    assert supported_tp_sizes(1, True, 2) == [1, 2]
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 exceeds kv_connector_extra_config\.max_tp_size=2"):
        plan_heads(8, 4, 0, is_mla=False, max_tp_size=2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 exceeds .*max_tp_size=1"):
        plan_heads(1, 2, 1, is_mla=True, max_tp_size=1)
    with pytest.raises(ValueError, match=r"max_tp_size must be one of \[1, 2, 4, 8\], got 3"):
        plan_heads(8, 1, 0, is_mla=False, max_tp_size=3)
    assert plan_heads(8, 2, 1, is_mla=False, max_tp_size=2).groups() == [(4, 4, 0)]


def test_mla_rank0_writes_every_rank_reads(tmp_path: pathlib.Path) -> None:
    h = hashes(2, seed=300, is_mla=True)
    ranks = [Rank(tmp_path, CacheLayout.MLA, tp=2, rank=r, seed=r) for r in range(2)]
    assert ranks[0].worker.can_save and not ranks[1].worker.can_save
    for rank in ranks:
        rank.save([1, 2], h)  # rank 1's save is a no-op by design
    assert ranks[0].store.stats().dumps == 2
    reader = Rank(tmp_path, CacheLayout.MLA_3D, tp=4, rank=3, seed=5)
    assert reader.load([7, 8], h) == set()
    assert torch.equal(reader.kv(7), ranks[0].kv(1)) and torch.equal(reader.kv(8), ranks[0].kv(2))


def test_finish_saves_are_reported_once_done_and_named_finished_by_every_rank(tmp_path: pathlib.Path) -> None:
    """A finished request's blocks are dumped from get_finished (no forward pass needed); the
    request is reported as finished sending once the dump is over and vLLM has named it finished,
    exactly once, by the writing rank and by a replica rank that writes nothing."""
    h = hashes(2, seed=1000, is_mla=True)
    ranks = [Rank(tmp_path, CacheLayout.MLA, tp=2, rank=r, seed=r) for r in range(2)]
    meta = UCMConnectorMetadata(finish_saves=[SaveSpec("done", [3, 4], h)])
    for rank in ranks:
        rank.worker.bind(meta)
        rank.worker.flush()
        assert rank.worker.poll_finished(set()) == (set(), set())  # not yet named finished by vLLM
        rank.worker.flush()
        assert rank.worker.poll_finished({"done"}) == ({"done"}, set())
        assert rank.worker.poll_finished({"done"}) == (set(), set())  # reported once
        rank.worker.bind(None)
    assert ranks[0].store.stats().dumps == 2 and ranks[1].store.stats().dumps == 0
    reader = Rank(tmp_path, CacheLayout.MLA, seed=5)
    assert reader.load([0, 1], h) == set()
    assert torch.equal(reader.kv(0), ranks[0].kv(3)) and torch.equal(reader.kv(1), ranks[0].kv(4))


def test_missing_blocks_are_reported_and_never_scattered(tmp_path: pathlib.Path) -> None:
    h = hashes(3, seed=400)
    src = Rank(tmp_path, CacheLayout.BHNC)
    src.save([1, 2], h[:2])
    dst = Rank(tmp_path, CacheLayout.BHNC, seed=4)
    untouched = dst.kv(6).clone()
    assert dst.load([5, 7, 6], h) == {6}
    assert torch.equal(dst.kv(5), src.kv(1)) and torch.equal(dst.kv(7), src.kv(2))
    assert torch.equal(dst.kv(6), untouched)
    stats = dst.worker.stats.take()
    assert stats is not None and stats.data["load_failures"] == 1 and stats.data["loaded_blocks"] == 2


def test_shapes_and_tp_sizes_that_cannot_work_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"matches no supported layout.*BHNC \[10, 4, 16, 16\]"):
        detect_layout((10, 4, 16, 15), num_blocks=10, block_size=16, num_heads=4, head_size=8, head_size_v=8,
                      is_mla=False, layer_name="l0")
    assert detect_layout((2, 10, 16, 4, 8), num_blocks=10, block_size=16, num_heads=4, head_size=8,
                         head_size_v=8, is_mla=False) is CacheLayout.FLASH_ATTN
    assert detect_layout((10, 2, 16, 4, 8), num_blocks=10, block_size=16, num_heads=4, head_size=8,
                         head_size_v=8, is_mla=False) is CacheLayout.FLASHINFER
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3.*supported tensor parallel sizes: \[1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64\]"):
        plan_heads(8, 3, 0, is_mla=False)
    replica = plan_heads(2, 4, 1, is_mla=False)  # 2 KV heads on 4 ranks: rank 1 holds a copy of head 0
    assert (replica.local_start, replica.local_count, replica.writes) == (0, 1, False)
    assert plan_heads(16, 2, 1, is_mla=False).groups() == [(8, 2, 0), (10, 2, 2), (12, 2, 4), (14, 2, 6)]


def test_host_staging_too_small_skips_saves_and_recomputes_loads(tmp_path: pathlib.Path) -> None:
    big = list(range(NB))
    h = hashes(NB, seed=500)
    tiny = Rank(tmp_path, CacheLayout.BHNC, staging=1 << 20)  # 1 MiB: one block of 4 heads is 6 KiB
    assert tiny.worker.paged is not None
    payload_bytes = tiny.worker.paged.block_nbytes(HEADS)
    assert 2 * NB * payload_bytes < (1 << 20)  # these fit ...
    tiny.save(big, h)
    assert tiny.store.stats().dumps == NB * HEADS  # one object per block per KV head
    tiny.worker.pool.capacity_bytes = payload_bytes  # ... now nothing fits: save skipped, no crash
    h2 = hashes(2, seed=600)
    tiny.save([0, 1], h2)
    assert tiny.worker.pool.in_use_bytes == 0
    dumps = tiny.store.stats().dumps
    tiny.worker.bind(UCMConnectorMetadata(finish_saves=[SaveSpec("f", [4, 5], hashes(2, seed=650))]))
    assert tiny.worker.poll_finished({"f"}) == ({"f"}, set())  # skipped, but its blocks are freed
    tiny.worker.bind(None)
    assert tiny.store.stats().dumps == dumps
    assert tiny.load([2, 3], h[:2]) == {2, 3}  # cannot stage: reported for recompute, not raised
    reader = Rank(tmp_path, CacheLayout.BHNC, seed=1)
    assert reader.load([0, 1], h2) == {0, 1}  # the skipped save really wrote nothing
