"""The vLLM-path offload measurement: GPU blocks held and store reads per decode step.

`BlockRetrievalSparse` with `offload` keeps a long request's windows and a few slots on the GPU and
reads selected blocks back from the store (`vllm_offload`). Its scheduler side is tested with vLLM's
real Scheduler and block pool (tests/sparse/test_sparse_vllm_offload.py); what that cannot show is
how often a trained model's selections need a block that is not in a slot, which decides the
store traffic. This replays one window of trained-model decode steps through the worker half
exactly as vLLM drives it — every layer's attention hook in turn over vLLM 0.32's paged layout, a
real FileStore holding every block once (all layers, as the connector stores them), the scheduler's
offload update at the first decode step — and measures, in the same run:

* outputs against the same selection without offload (equal: the offloaded blocks' GPU copies are
  overwritten with NaN once freed, so reading one would show);
* GPU blocks held by the request with and without offload;
* per decode step: blocks placed into slots (host -> device copies of one layer), whole blocks read
  from the store on demand (the layer waits) and ahead of need (prefetch of the scoring's runners-up
  and rising blocks), and bytes read from the store against the KV bytes dense attention reads —
  with prefetch and without, over the same store.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import xxhash

from ucm.bench.common import synchronized_time
from ucm.bench.sparse_data import LayerQKV
from ucm.bench.sparse_paged import DecodeMetadata
from ucm.sparse import retrieval_math as rm
from ucm.sparse.base import SparseRole
from ucm.sparse.block_retrieval import BlockRetrievalConfig, BlockRetrievalMeta, BlockRetrievalSparse
from ucm.sparse.offload import bytes_view
from ucm.sparse.paged import LayerKV, paged_reference_attention
from ucm.sparse.vllm_offload import OffloadedBlock, OffloadUpdate, num_slots
from ucm.store import FileStore
from ucm.store.base import BlockLayout, BlocksMissing, Task
from ucm.transfer.paged import KVLayout

# what differs between the runs with and without prefetch (the rest is reported once)
PER_RUN = ("max_abs_diff_vs_resident", "first_step_store_reads", "placements_per_step_per_layer", "slot_hit_ratio",
           "store_reads_per_step", "host_hits_per_step", "prefetched_per_step", "prefetch_hits_per_step",
           "store_bytes_per_step", "hook_ms_per_step_offload", "hook_ms_per_step_resident")


class FileStoreRead:
    def __init__(self, hashes: Sequence[bytes], out: torch.Tensor, task: Task) -> None:
        self.hashes, self.out, self.task = hashes, out, task

    def wait(self) -> torch.Tensor:
        found = self.task.wait()
        if not all(found):
            gone = [h for h, hit in zip(self.hashes, found, strict=True) if not hit]
            raise BlocksMissing(f"block {gone[0].hex()} is missing", gone)
        return self.out


class FileStoreReader:
    """The connector's `BlockReader` contract over a FileStore holding [layers, H, bs, 2, D] blocks."""

    def __init__(self, store: FileStore, layout: BlockLayout, shape: tuple[int, ...], layer_names: Sequence[str]):
        self.store, self.layout, self.shape = store, layout, shape
        self.index = {name: i for i, name in enumerate(layer_names)}

    def start_read(self, block_hashes: Sequence[bytes], ahead: bool = False) -> FileStoreRead:
        out = torch.empty(len(block_hashes), *self.shape)
        task = self.store.load(list(block_hashes), [bytes_view(out[i]) for i in range(len(block_hashes))], self.layout)
        return FileStoreRead(block_hashes, out, task)

    def layer_of(self, layer_name: str) -> int:
        return self.index[layer_name]

    def keep_stored(self, block_hashes: Sequence[bytes]) -> int:
        return len(block_hashes) - self.store.touch(list(block_hashes))


def bench_vllm_offload(
    config: BlockRetrievalConfig, layers: list[LayerQKV], block_size: int, decode_steps: int, seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Decode the window's last `decode_steps` positions through every layer's hook, with offload
    and without; the paged caches live on `device`, the store in a temporary directory."""
    dev = torch.device(device)
    t, heads, d = layers[0].key.shape
    nb_all = math.ceil(t / block_size)
    slots = num_slots(config, nb_all)
    total = nb_all + slots
    physical = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    rows, slot_ids = physical[:nb_all], physical[nb_all:].tolist()
    names = [f"model.layers.{lq.layer}.self_attn.attn" for lq in layers]
    caches: dict[str, torch.Tensor] = {}
    blocks = torch.zeros(nb_all, len(layers), heads, block_size, 2, d)  # the store's block layout
    for i, (name, lq) in enumerate(zip(names, layers, strict=True)):
        kb, _ = rm.to_block_major(lq.key, block_size)  # [H, NB, bs, D]
        vb, _ = rm.to_block_major(lq.value, block_size)
        caches[name] = torch.zeros(total, heads, block_size, 2 * d, device=dev)
        caches[name][rows.to(dev)] = torch.cat([kb, vb], dim=-1).transpose(0, 1).to(dev)
        blocks[:, i] = torch.stack([kb, vb], dim=-2).transpose(0, 1)
    resident = {name: c.clone() for name, c in caches.items()}  # the run without offload
    hashes = [xxhash.xxh3_128_digest(f"bench-block-{seed}-{b}".encode()) for b in range(nb_all)]
    layout = BlockLayout("float32", tuple(blocks.shape[1:]), 4)
    with tempfile.TemporaryDirectory(prefix="ucm-sparse-offload-") as tmp:
        store = FileStore(tmp, salt=b"\x5b" * 16, io_threads=4)
        try:
            if not all(store.dump(hashes, [bytes_view(blocks[b]) for b in range(nb_all)], layout).wait()):
                raise RuntimeError("offload bench: a block could not be written to the store")
            reader = FileStoreReader(store, layout, tuple(blocks.shape[1:]), names)
            runs = {
                label: _replay(config, layers, names, {n: c.clone() for n, c in caches.items()}, resident, rows,
                               slot_ids, hashes, reader, block_size, decode_steps, prefetch, dev)
                for label, prefetch in (("prefetch", True), ("no_prefetch", False))
            }
            return {**{k: v for k, v in runs["prefetch"].items() if k not in PER_RUN}, **{
                label: {k: v for k, v in run.items() if k in PER_RUN} for label, run in runs.items()},
                "keepalive": _keepalive_cost(reader, hashes)}
        finally:
            store.index_ready.wait(timeout=60)  # the shard directories are made on a background thread
            store.close()


def _keepalive_cost(reader: FileStoreReader, hashes: list[bytes]) -> dict[str, Any]:
    """What the worker's keep-alive (touching every offloaded block's object, see
    `vllm_offload.KEEPALIVE_S`) costs per block, next to reading the same blocks from the store."""
    t0 = time.perf_counter()
    missing = reader.keep_stored(hashes)
    t1 = time.perf_counter()
    reader.start_read(hashes).wait()
    t2 = time.perf_counter()
    if missing:
        raise RuntimeError(f"offload bench: {missing} stored blocks vanished")
    return {"blocks": len(hashes), "touch_us_per_block": round((t1 - t0) / len(hashes) * 1e6, 1),
            "read_us_per_block": round((t2 - t1) / len(hashes) * 1e6, 1)}


def _replay(
    config: BlockRetrievalConfig, layers: list[LayerQKV], names: list[str], caches: dict[str, torch.Tensor],
    resident: dict[str, torch.Tensor], rows: torch.Tensor, slot_ids: list[int], hashes: list[bytes],
    reader: FileStoreReader, block_size: int, decode_steps: int, prefetch: bool, dev: torch.device,
) -> dict[str, Any]:
    t, heads, d = layers[0].key.shape
    offload_sparse = BlockRetrievalSparse(config, SparseRole.WORKER)
    offload_sparse.register_block_reader(reader)
    plain = BlockRetrievalSparse(dataclasses.replace(config, offload=False), SparseRole.WORKER)
    assert offload_sparse.worker_offload is not None
    offload_sparse.worker_offload.prefetch_enabled = prefetch
    counters = offload_sparse.worker_offload.counters
    itemsize = caches[names[0]].element_size()
    per_step: list[dict[str, int]] = []
    max_diff, gpu_blocks, step_s, plain_s = 0.0, 0, [], []
    first = t - decode_steps
    for pos in range(first - 1, t):  # one step before: the prefill that passes every block through attention
        seq_len = pos + 1
        nb = math.ceil(seq_len / block_size)
        slot = int(rows[pos // block_size]) * block_size + pos % block_size
        before = dataclasses.asdict(counters)
        meta = BlockRetrievalMeta(tuple(rows.tolist())) if pos == first - 1 else BlockRetrievalMeta()
        offload_meta = meta
        if pos >= first:
            init, local = rm.fixed_window(nb, config.init_blocks, config.local_blocks)
            freed = range(init.stop, local.start) if pos == first else range(0)
            offload_meta = BlockRetrievalMeta(meta.fresh_blocks, (OffloadUpdate(
                "r", anchor=int(rows[nb - 1]), first=pos == first,
                offloaded=tuple(OffloadedBlock(b, int(rows[b]), hashes[b]) for b in freed),
                new_slots=tuple(slot_ids) if pos == first else ()),))
        plain.execute_begin(meta)
        offload_sparse.execute_begin(offload_meta)
        if pos == first:  # freed: whatever the GPU blocks hold from now on must never be read
            offloaded = rows[init.stop : local.start].to(dev)
            for cache in caches.values():
                cache[offloaded] = math.nan
            gpu_blocks = nb - len(offloaded) + len(slot_ids)
        for lq, name in zip(layers, names, strict=True):
            md = DecodeMetadata(1, torch.tensor([0, 1], device=dev), torch.tensor([seq_len], device=dev), seq_len,
                                rows[None].to(dev), torch.tensor([slot], device=dev))
            query = lq.query[pos : pos + 1].to(dev)
            t0 = synchronized_time(dev)
            compacted = offload_sparse.attention_begin(name, query, LayerKV.from_layer_cache(caches[name], KVLayout.BHNC, d), md)
            out = paged_reference_attention(query, LayerKV.from_layer_cache(caches[name], KVLayout.BHNC, d), compacted, d**-0.5)
            t1 = synchronized_time(dev)
            plain_md = plain.attention_begin(name, query, LayerKV.from_layer_cache(resident[name], KVLayout.BHNC, d), md)
            expected = paged_reference_attention(query, LayerKV.from_layer_cache(resident[name], KVLayout.BHNC, d), plain_md, d**-0.5)
            t2 = synchronized_time(dev)
            if pos >= first:
                step_s.append(t1 - t0)
                plain_s.append(t2 - t1)
                diff = float((out - expected).abs().max())
                max_diff = max(max_diff, math.inf if math.isnan(diff) else diff)  # max() would drop a NaN
        offload_sparse.execute_finished()
        plain.execute_finished()
        if pos >= first:
            after = dataclasses.asdict(counters)
            per_step.append({k: after[k] - before[k] for k in after})
    offload_sparse.close()
    later = per_step[1:]  # the first offloading step fills the slots from nothing
    block_bytes = len(layers) * heads * block_size * 2 * d * itemsize
    dense_step_bytes = 2 * t * heads * d * itemsize * len(layers)
    return {
        "tokens": t, "blocks": math.ceil(t / block_size), "layers": len(layers), "decode_steps": decode_steps,
        "max_abs_diff_vs_resident": max_diff,
        "gpu_blocks_resident": math.ceil(t / block_size), "gpu_blocks_offload": gpu_blocks,
        "slots": len(slot_ids),
        "first_step_store_reads": per_step[0]["store_reads"],
        "placements_per_step_per_layer": round(statistics.fmean(s["fetched_blocks"] for s in later) / len(layers), 2),
        "slot_hit_ratio": round(sum(s["slot_hits"] for s in later)
                                / max(1, sum(s["slot_hits"] + s["fetched_blocks"] for s in later)), 3),
        "store_reads_per_step": round(statistics.fmean(s["store_reads"] for s in later), 2),
        "host_hits_per_step": round(statistics.fmean(s["host_hits"] for s in later), 2),
        "prefetched_per_step": round(statistics.fmean(s["prefetched"] for s in later), 2),
        "prefetch_hits_per_step": round(statistics.fmean(s["prefetch_hits"] for s in later), 2),
        "store_bytes_per_step": round(statistics.fmean(s["store_reads"] + s["prefetched"] for s in later) * block_bytes),
        "dense_kv_bytes_per_step": dense_step_bytes,
        "hook_ms_per_step_offload": round(1e3 * sum(step_s) / decode_steps, 2),
        "hook_ms_per_step_resident": round(1e3 * sum(plain_s) / decode_steps, 2),
    }


def bench_vllm_offload_windows(
    config: BlockRetrievalConfig, windows: list[list[LayerQKV]], block_size: int, decode_steps: int
) -> dict[str, Any]:
    """`bench_vllm_offload` over every window: means, except the worst output difference."""
    runs = [bench_vllm_offload(config, layers, block_size, decode_steps, seed=i) for i, layers in enumerate(windows)]

    def merge(items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items[0].items():
            if isinstance(value, dict):
                out[key] = merge([item[key] for item in items])
            elif key == "max_abs_diff_vs_resident":
                out[key] = max(item[key] for item in items)
            else:
                out[key] = round(statistics.fmean(item[key] for item in items), 3)
        return out

    return {"windows": len(runs), "config": {"keep_ratio": config.keep_ratio, "prefetch_blocks": config.prefetch_blocks,
                                             "host_cache_blocks": config.host_cache_blocks}, **merge(runs)}
