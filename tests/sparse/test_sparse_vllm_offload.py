"""Sparse offload through vLLM 0.32's real Scheduler, KVCacheManager and block pool, the real
UCMConnector (both roles) and a real store: stored blocks outside the windows leave the GPU, the
freed blocks serve another request, and attention over fetched blocks equals attention without
offload. The model is the connector harness's deterministic stand-in and the attention kernel a
torch reference (no GPU); everything from the scheduler to the store is real."""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "connector"))

from paged_metadata import triton_metadata
from ucm_connector_harness import HEAD, LAYERS, Engine, write_model_dir

from ucm.sparse import SparseConfigError, SparseRole, shutdown_sparse, vllm_patch
from ucm.sparse.block_retrieval import BlockRetrievalConfig, BlockRetrievalMeta, BlockRetrievalSparse
from ucm.sparse.offload import OffloadError
from ucm.sparse.paged import LayerKV, paged_reference_attention
from ucm.sparse.registry import get_active_sparse
from ucm.sparse.vllm_offload import num_slots, offload_bound_blocks
from ucm.transfer.paged import KVLayout

BS = 16
LAYER0 = LAYERS[0]
HQ = 4  # the harness model's query heads (2 KV heads)
SPARSE = {"name": "block_retrieval", "keep_ratio": 0.25, "min_blocks": 8, "init_blocks": 1, "local_blocks": 2,
          "prefetch_blocks": 1, "host_cache_blocks": 4}


pytestmark = pytest.mark.usefixtures("clean_sparse")


class Attention:
    """Plays vLLM's model runner around attention: keeps the worker's block table (as the scheduler
    output grows it: freed ids stay in it), builds real TritonAttentionMetadata for the step and
    calls the installed wrapper around a torch paged-attention kernel; records decode outputs."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}
        self.outputs: dict[tuple[str, int, int], torch.Tensor] = {}  # (request, position, layer)
        self.step = -1

    def track(self, so: Any) -> None:
        self.step += 1
        for req in so.scheduled_new_reqs:
            self.tables[req.req_id] = list(req.block_ids[0])
        cached = so.scheduled_cached_reqs
        for req_id, new in zip(cached.req_ids, cached.new_block_ids, strict=True):
            if req_id in cached.resumed_req_ids:  # after a preemption the list replaces the old one
                self.tables[req_id] = list(new[0]) if new is not None else []
            elif new is not None:
                self.tables[req_id] += list(new[0])

    def __call__(self, engine: Engine, so: Any, layer: int, name: str) -> None:
        if layer == 0:
            self.track(so)
        req_ids = list(so.num_scheduled_tokens)
        seq_lens = [engine.requests[r].num_computed_tokens for r in req_ids]
        query_lens = [so.num_scheduled_tokens[r] for r in req_ids]
        metadata = triton_metadata([self.tables[r] for r in req_ids], seq_lens, query_lens, BS)
        qsl = metadata.query_start_loc
        gen = torch.Generator().manual_seed(1000 * self.step + layer)
        query = torch.randn(metadata.num_actual_tokens, HQ, HEAD, generator=gen)

        def kernel(impl: Any, lay: Any, q: Any, k: Any, v: Any, cache: Any, md: Any, output: Any, **_: Any) -> Any:
            paged = LayerKV.from_layer_cache(cache, KVLayout.BHNC, HEAD)
            output.copy_(paged_reference_attention(q, paged, md, HEAD**-0.5))
            return output

        output = torch.zeros_like(query)
        wrapper = vllm_patch.make_attention_wrapper(kernel)
        wrapper(SimpleNamespace(head_size=HEAD), SimpleNamespace(layer_name=name), query, None, None,
                engine.caches[name], metadata, output)
        for row, r in enumerate(req_ids):
            if query_lens[row] == 1:
                self.outputs[(r, seq_lens[row] - 1, layer)] = output[int(qsl[row])].clone()


R1_PROMPT = [(7 * i) % 200 for i in range(40 * BS)]


def run(
    tmp: pathlib.Path, *, offload: bool, num_blocks: int, preempt_at: int | None = None, role: str = "kv_both",
    store: pathlib.Path | None = None,
) -> tuple[Engine, Attention, dict[str, Any]]:
    """r1 (40 prompt blocks) decodes 48 tokens; r2 (30 prompt blocks) arrives once r1 is decoding;
    `preempt_at`: vLLM preempts r1 before that step (its own `_preempt_request`, as when a running
    request needs a block the pool lacks), then resumes it from the prefix cache and the store."""
    attention = Attention()
    engine = Engine(
        write_model_dir(tmp / "model"), store or tmp / f"store-{offload}", num_blocks=num_blocks, role=role,
        attention=attention, extra={"ucm_sparse_config": {**SPARSE, "offload": offload}},
    )
    sparse = engine.scheduler.connector.scheduler_side.sparse  # type: ignore[union-attr]
    engine.add("r1", R1_PROMPT, max_tokens=48)
    seen: dict[str, Any] = {"r1_gpu_blocks": [], "r1_prefill_gpu_blocks": [], "r1_offloaded": set(),
                            "r1_logical": set(), "r2_blocks": set(), "dropped": [], "r1_first": 0}
    for step in range(200):
        if not engine.scheduler.has_unfinished_requests() and not engine.scheduler.requests:
            break
        if step == 8:
            engine.add("r2", [(11 * i + 3) % 200 for i in range(30 * BS)], max_tokens=4)
        if step == preempt_at:
            r1 = engine.requests["r1"]
            engine.scheduler.running.remove(r1)
            engine.scheduler._preempt_request(r1, time.monotonic())
        engine.flush()  # saves complete between steps, so the store holds blocks by the next lookup
        so = engine.step()
        meta = so.kv_connector_metadata.sparse_meta
        assert isinstance(meta, BlockRetrievalMeta)
        seen["dropped"] += meta.dropped
        for update in meta.offload:
            seen["r1_offloaded"].update(b.physical for b in update.offloaded if update.req_id == "r1")
            seen["r1_logical"].update(b.logical for b in update.offloaded if update.req_id == "r1")
            seen["r1_first"] += update.first and update.req_id == "r1"
        if "r2" in attention.tables:
            seen["r2_blocks"].update(attention.tables["r2"])
        if offload and "r1" in sparse.scheduler_offload.held:
            chunk = so.num_scheduled_tokens.get("r1", 0)
            seen["r1_gpu_blocks" if chunk <= 1 else "r1_prefill_gpu_blocks"].append(
                sparse.scheduler_offload.gpu_blocks("r1"))
    else:
        raise AssertionError("requests did not finish")
    meta = engine.step().kv_connector_metadata.sparse_meta  # the step that reports the last finish
    seen["dropped"] += meta.dropped
    seen["free_blocks"] = engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    seen["stats"] = {k: sum(s.get(k, 0) for s in engine.stats) for k in ("sparse_offloaded_blocks",
                     "sparse_slot_loads", "sparse_store_reads", "sparse_prefetched", "sparse_slot_shortfall")}
    seen["worker"] = get_active_sparse("worker")
    return engine, attention, seen


@pytest.mark.parametrize("preempt_at", [None, 20])
def test_offloaded_decode_equals_resident_decode_and_frees_gpu_blocks(
    tmp_path: pathlib.Path, preempt_at: int | None
) -> None:
    _, dense, _ = run(tmp_path, offload=False, num_blocks=128)
    shutdown_sparse()
    # r1 + r2 need 74 blocks without offload
    _, offloaded, seen = run(tmp_path, offload=True, num_blocks=64, preempt_at=preempt_at)
    # every decode output of every layer, with r1's blocks fetched back into slots, equals the
    # resident run's, although r2 took some of r1's freed GPU blocks and wrote its own KV there
    # (a preempted r1 computes the token it was to decode inside its resume prefill: one position fewer)
    missing = dense.outputs.keys() - offloaded.outputs.keys()
    assert offloaded.outputs.keys() <= dense.outputs.keys() and len(missing) == (0 if preempt_at is None else 2)
    assert len(offloaded.outputs) >= 2 * 47
    for key, out in offloaded.outputs.items():
        torch.testing.assert_close(out, dense.outputs[key], rtol=0, atol=0, msg=str(key))
    assert seen["r1_offloaded"] & seen["r2_blocks"]
    worker = seen["worker"]
    assert isinstance(worker, BlockRetrievalSparse) and worker.worker_offload is not None
    counters = worker.worker_offload.counters
    assert counters.fetched_blocks > 0 and counters.store_reads > 0 and counters.slot_hits > 0
    # the workers' counters reach vLLM's connector stats (logged, and exported as vllm:ucm_sparse_*)
    assert seen["stats"] == {"sparse_offloaded_blocks": counters.offloaded_blocks,
                             "sparse_slot_loads": counters.fetched_blocks, "sparse_store_reads": counters.store_reads,
                             "sparse_prefetched": counters.prefetched, "sparse_slot_shortfall": 0}
    # r1 holds its windows, bounded slots and at most the block just filled (saved at the end of the
    # step that fills it, looked up the next), not 41-43 blocks: generated tokens' blocks leave too
    nb = 43
    config = BlockRetrievalConfig.from_dict({k: v for k, v in SPARSE.items() if k != "name"})
    bound = 1 + 2 + num_slots(config, nb) + 1
    assert max(seen["r1_gpu_blocks"]) <= bound < nb
    # and while its later prompt chunks prefill (256 tokens: 16 blocks a step), what earlier chunks
    # stored has left too: it holds its windows, the chunk, bounded slots and the block before the chunk
    assert seen["r1_prefill_gpu_blocks"], "r1 offloaded nothing while its prompt was prefilling"
    assert max(seen["r1_prefill_gpu_blocks"]) <= 1 + 1 + 16 + num_slots(config, nb) + 1 < nb
    assert seen["r1_logical"] == set(range(1, 41))  # at the last step: all but block 0 and blocks 41-42
    assert seen["free_blocks"] == 64 - 1  # every block and slot back in the pool (one is vLLM's null block)
    assert worker.worker_offload.requests == {}  # the workers forgot every finished request
    if preempt_at is None:
        assert seen["dropped"] == ["r2", "r1"] and seen["r1_first"] == 1
    else:  # the preemption returned r1's slots; once resumed and decoding, r1 offloaded afresh
        assert sorted(seen["dropped"]) == ["r1", "r1", "r2"] and seen["r1_first"] == 2



def test_pd_decode_side_offloads_the_blocks_it_loaded(tmp_path: pathlib.Path) -> None:
    """A kv_consumer (PD decode pod) never saves: what it may offload is what it loaded from the
    producer's dump. Outputs equal the consumer's without offload."""
    store = tmp_path / "shared-store"
    producer = Engine(write_model_dir(tmp_path / "model"), store, role="kv_producer")
    producer.add("r1", R1_PROMPT, max_tokens=1)
    producer.run_until_idle()
    producer.flush()
    _, dense, _ = run(tmp_path, offload=False, num_blocks=128, role="kv_consumer", store=store)
    shutdown_sparse()
    engine, offloaded, seen = run(tmp_path, offload=True, num_blocks=64, role="kv_consumer", store=store)
    assert engine.metas[0].loads and engine.metas[0].loads[0].req_id == "r1"  # the prompt came from the store
    assert dense.outputs.keys() == offloaded.outputs.keys() and len(offloaded.outputs) >= 2 * 48
    for key, out in offloaded.outputs.items():
        torch.testing.assert_close(out, dense.outputs[key], rtol=0, atol=0, msg=str(key))
    # blocks 0..38 were loaded (never the whole prompt: the last block is computed here) and left
    # the GPU at the first decode step; block 39 and the generated blocks, which this decode pod
    # computed, it saved itself and they left too once out of the local window
    assert seen["r1_first"] == 1 and seen["r1_logical"] == set(range(1, 41))
    assert seen["free_blocks"] == 64 - 1

def test_offloaded_blocks_gone_from_the_store_are_left_out_not_fatal(tmp_path: pathlib.Path) -> None:
    """A lost volume (or a gc down to less than the offloaded blocks take) removed blocks a
    decoding request had offloaded. Failing the step would stop the engine with every request in
    it: the request decodes on without exactly those blocks, which never reach the kernel through
    their freed GPU ids (poisoned here), and the loss is logged and counted."""
    attention = Attention()
    engine = Engine(
        write_model_dir(tmp_path / "model"), tmp_path / "store", num_blocks=64, attention=attention,
        extra={"ucm_sparse_config": {**SPARSE, "offload": True}},
    )
    engine.add("r1", R1_PROMPT, max_tokens=48)
    worker = get_active_sparse("worker")
    assert isinstance(worker, BlockRetrievalSparse) and worker.worker_offload is not None
    offload = worker.worker_offload
    while "r1" not in offload.requests:
        engine.flush()
        engine.step()
    req = offload.requests["r1"]
    side = engine.worker.worker_side
    gone = dict(list(req.hashes.items())[::2])  # every other offloaded block
    keys = side._keys(list(gone.values()))  # one object per (block, head group)
    assert side.store.remove(keys) == len(keys) >= len(gone) > 0
    offload.close()
    offload._host.clear()
    freed = torch.tensor(attention.tables["r1"])[list(gone)]
    for cache in engine.caches.values():
        cache[freed] = math.nan  # what those GPU blocks hold must never be attended again
    while engine.scheduler.has_unfinished_requests():
        engine.flush()
        engine.step()
    assert req.lost and req.lost <= gone.keys()
    assert offload.counters.lost_blocks == len(req.lost)
    assert sum(s.get("sparse_lost_blocks", 0) for s in engine.stats) == len(req.lost)
    decoded = [out for (r, pos, _), out in attention.outputs.items() if r == "r1"]
    assert len(decoded) >= 40 * len(LAYERS) and all(bool(torch.isfinite(out).all()) for out in decoded)


def test_offloaded_blocks_outlive_store_eviction_while_their_request_decodes(tmp_path: pathlib.Path) -> None:
    """An unselected offloaded block is read by nobody, yet its request needs it until it finishes.
    The worker touches the objects of every offloaded block (every KEEPALIVE_S; here every step), so
    when they are as old as another request's blocks, `ucm store gc` down to the recently used
    objects removes the other request's and none of theirs, and decoding goes on reading them."""
    from ucm.cli import main as ucm_main
    from ucm.store.format import object_path

    engine = Engine(write_model_dir(tmp_path / "model"), tmp_path / "store", num_blocks=64, attention=Attention(),
                    extra={"ucm_sparse_config": {**SPARSE, "offload": True}})
    engine.add("r0", [(5 * i + 1) % 200 for i in range(8 * BS)], max_tokens=1)  # other data in the store
    engine.run_until_idle()
    engine.add("r1", R1_PROMPT, max_tokens=48)
    worker = get_active_sparse("worker")
    assert isinstance(worker, BlockRetrievalSparse) and worker.worker_offload is not None
    offload, side = worker.worker_offload, engine.worker.worker_side
    offload.keepalive_s = 0.0
    while "r1" not in offload.requests:
        engine.flush()
        engine.step()
    engine.flush()
    offload.close()  # the touch in flight lands
    objects = side.store._objects

    def sizes() -> dict[str, int]:
        return {e.path: e.stat().st_size for d in os.scandir(objects) if d.is_dir() for e in os.scandir(d.path)}

    # Everything is an hour old but r1's blocks still on the GPU (just written, as in real life).
    offloaded = set(offload.requests["r1"].hashes.values())
    stored = engine.scheduler.connector.scheduler_side.stored_block_hashes("r1")  # type: ignore[union-attr]
    resident = {object_path(objects, k) for k in side._keys([h for h in stored if h not in offloaded])}
    hour_ago = time.time_ns() - 3600 * 10**9
    for path in sizes().keys() - resident:
        os.utime(path, ns=(hour_ago, hour_ago))
    engine.step()  # touches every offloaded block's objects (those it offloads now too)
    offload.close()
    kept = {object_path(objects, k) for k in side._keys(list(offload.requests["r1"].hashes.values()))}
    assert offload.counters.missing_stored == 0 and offload.counters.kept_stored > 0 and kept
    before = sizes()
    fresh = {p for p in before if os.stat(p).st_mtime_ns > hour_ago}
    assert kept <= fresh and len(before) > len(fresh)
    assert ucm_main(["store", "gc", "--path", side.store.root,
                     "--max-bytes", str(sum(before[p] for p in fresh))]) == 0
    after = sizes()
    assert kept <= after.keys() and after.keys() == fresh  # the aged objects (r0's) went, no kept one
    offload._host.clear()  # reads must come from the store
    while engine.scheduler.has_unfinished_requests():
        engine.flush()
        engine.step()
    assert offload.counters.store_reads > 0 and offload.counters.missing_stored == 0


@pytest.mark.parametrize("offload", [False, True])
def test_a_request_larger_than_the_pool_is_admitted_only_with_offload(tmp_path: pathlib.Path, offload: bool) -> None:
    """r1's 40 prompt blocks exceed a pool of 24: vLLM's full-prompt gate keeps it waiting; under
    offload the gate counts what it holds (windows, a 4-block chunk, slots) and it completes."""
    engine = Engine(
        write_model_dir(tmp_path / "model"), tmp_path / "store", num_blocks=24, max_batched_tokens=4 * BS,
        attention=Attention(), extra={"ucm_sparse_config": {**SPARSE, "offload": offload}},
    )
    sparse = engine.scheduler.connector.scheduler_side.sparse  # type: ignore[union-attr]
    engine.add("r1", R1_PROMPT, max_tokens=8)
    held = []
    for _ in range(60):
        if not engine.scheduler.has_unfinished_requests():
            break
        engine.flush()
        engine.step()
        if offload and "r1" in sparse.scheduler_offload.held:
            held.append(sparse.scheduler_offload.gpu_blocks("r1"))
    request = engine.requests["r1"]
    if not offload:
        assert engine.scheduler.has_unfinished_requests() and request.num_computed_tokens == 0  # never admitted
        return
    assert not engine.scheduler.has_unfinished_requests() and request.num_output_tokens == 8
    config = BlockRetrievalConfig.from_dict({k: v for k, v in SPARSE.items() if k != "name"})
    assert max(held) <= offload_bound_blocks(config, BS, len(R1_PROMPT) + 8, 4 * BS) < 24 < len(R1_PROMPT) // BS


def test_offload_config_is_validated() -> None:
    with pytest.raises(SparseConfigError, match=r"ucm_sparse_config\.offload: expected true or false, got 'yes'"):
        BlockRetrievalConfig.from_dict({"offload": "yes"})
    with pytest.raises(SparseConfigError, match=r"ucm_sparse_config\.host_cache_blocks: expected int >= 1"):
        BlockRetrievalConfig.from_dict({"offload": True, "host_cache_blocks": 0})
    spec_decode = SimpleNamespace(speculative_config=object(), cache_config=SimpleNamespace(block_size=16))
    with pytest.raises(SparseConfigError, match=r"ucm_sparse_config\.offload: speculative decoding is configured"):
        BlockRetrievalSparse(BlockRetrievalConfig(offload=True), SparseRole.SCHEDULER, spec_decode)
    BlockRetrievalSparse(BlockRetrievalConfig(offload=False), SparseRole.SCHEDULER, spec_decode)  # fine without


def test_a_prefetch_without_host_staging_is_skipped_not_waited_for(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads ahead of need take host staging only if it is free at once; a demand read waits for it
    (up to the pool's timeout) and then fails naming the setting."""
    from ucm.connector.connector import STAGING_ENV
    from ucm.store.base import StoreError

    monkeypatch.setenv(STAGING_ENV, str(1 << 20))
    engine = Engine(write_model_dir(tmp_path / "model"), tmp_path / "store", num_blocks=64, attention=Attention(),
                    extra={"ucm_sparse_config": {**SPARSE, "offload": True}})
    engine.add("r1", R1_PROMPT, max_tokens=4)
    worker = get_active_sparse("worker")
    assert isinstance(worker, BlockRetrievalSparse) and worker.worker_offload is not None
    while "r1" not in worker.worker_offload.requests:
        engine.flush()
        engine.step()
    side = engine.worker.worker_side
    worker.worker_offload.close()  # reads ahead in flight hold staging too: let them land first
    engine.flush()  # and so do the saves of the prompt chunk it offloaded in
    held = side.pool.acquire(side.pool.capacity_bytes, timeout=0.0)  # another transfer holds all of it
    try:
        req = worker.worker_offload.requests["r1"]
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="no host staging for 2 blocks"):
            side.start_read([req.hashes[1], req.hashes[2]], ahead=True)
        assert time.monotonic() - t0 < 0.5  # at once, not after the pool's timeout
        before = worker.worker_offload.counters.prefetched
        worker.worker_offload.prefetch(req, LAYER0, [1, 2, 3])
        assert worker.worker_offload.counters.prefetched == before
        with pytest.raises(OffloadError, match=r"cannot be read back: no host staging .*UCM_HOST_STAGING_BYTES"):
            worker.worker_offload._read([next(h for h in req.hashes.values() if h not in worker.worker_offload._host)])
    finally:
        side.pool.release(held)
