"""The vLLM-path measurement: block retrieval through the attention hook on a paged cache.

`ucm bench sparse` measures the algorithm per KV head (`DecodeLayer`). Inside vLLM the selection
is per request row instead (one block table row serves every head), made by
`BlockRetrievalSparse.attention_begin` and applied by compacting the row. This replays the same
trained-model decode steps through exactly that code — the paged cache in vLLM 0.32's layout,
attention metadata with shuffled physical blocks, the hook, the compaction — with a plain torch
paged attention standing in for the GPU kernel, so the accuracy of what runs in vLLM is measured too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from ucm.bench.sparse_data import LayerQKV
from ucm.bench.sparse_tally import KEEP_RATIOS, Tally, exact_topk_recall
from ucm.sparse import retrieval_math as rm
from ucm.sparse.base import SparseRole
from ucm.sparse.block_retrieval import BlockRetrievalConfig, BlockRetrievalMeta, BlockRetrievalSparse
from ucm.sparse.paged import LayerKV, paged_reference_attention
from ucm.transfer.paged import KVLayout


@dataclasses.dataclass
class DecodeMetadata:
    """The fields of vLLM's attention metadata that the hook reads and rewrites."""

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


def paged_layer(lq: LayerQKV, block_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A BHNC cache holding the layer's K/V in shuffled physical blocks, and the logical->physical row."""
    t, heads, d = lq.key.shape
    nb = math.ceil(t / block_size)
    physical = torch.randperm(nb + 4, generator=torch.Generator().manual_seed(seed))[:nb]
    cache = torch.zeros(nb + 4, heads, block_size, 2 * d)
    kb, _ = rm.to_block_major(lq.key, block_size)  # [H, NB, bs, D]
    vb, _ = rm.to_block_major(lq.value, block_size)
    cache[physical] = torch.cat([kb, vb], dim=-1).transpose(0, 1)
    return cache, physical


def run_paged(
    config: BlockRetrievalConfig, tally: Tally, lq: LayerQKV, decode_steps: int, block_size: int, seed: int
) -> None:
    """Decode the last `decode_steps` positions of the layer through the hook; dense on the same cache."""
    t, heads, d = lq.key.shape
    scale = d**-0.5
    cache, physical = paged_layer(lq, block_size, seed)
    paged = LayerKV.from_layer_cache(cache, KVLayout.BHNC, d)
    sparse = BlockRetrievalSparse(config, SparseRole.WORKER)
    layer_name = f"layer{lq.layer}"
    for pos in range(t - decode_steps, t):
        seq_len = pos + 1
        slot = int(physical[pos // block_size]) * block_size + pos % block_size
        md = DecodeMetadata(1, torch.tensor([0, 1]), torch.tensor([seq_len]), seq_len, physical[None].clone(),
                            torch.tensor([slot]))
        query = lq.query[pos : pos + 1]  # [1 token, heads, D]
        scorings_before = sum(s.scorings for s in sparse._states.values())
        # the first step reports every block fresh: the cache was filled directly (as a connector
        # load fills it), not through attention's slot writes
        first = pos == t - decode_steps
        sparse.execute_begin(BlockRetrievalMeta(tuple(physical.tolist())) if first else None)
        t0 = time.perf_counter()
        compacted = sparse.attention_begin(layer_name, query, paged, md)
        out = paged_reference_attention(query, paged, compacted, scale)
        t1 = time.perf_counter()
        dense = paged_reference_attention(query, paged, md, scale)
        t2 = time.perf_counter()
        sparse.execute_finished()
        rescored = sum(s.scorings for s in sparse._states.values()) > scorings_before
        tally.sparse_s += t1 - t0
        tally.dense_s += t2 - t1
        tally.add(out[0], dense[0], lq.query.shape[1])
        itemsize = cache.element_size()
        nb = math.ceil(seq_len / block_size)
        summary_bytes = rm.BlockSummaries.empty(config.summary, heads, nb, d, cache.dtype, "meta").nbytes(config.summary)
        tally.sparse_bytes += 2 * int(compacted.seq_lens[0]) * heads * d * itemsize + (summary_bytes if rescored else 0)
        tally.dense_bytes += 2 * seq_len * heads * d * itemsize
        tally.steps += 1
        kept = compacted.block_table[0, : math.ceil(int(compacted.seq_lens[0]) / block_size)].tolist()
        logical = torch.tensor([physical.tolist().index(p) for p in kept])
        kb, n = rm.to_block_major(lq.key[:seq_len], block_size)
        vb, _ = rm.to_block_major(lq.value[:seq_len], block_size)
        mass = rm.block_attention_mass(query[0], kb, n, scale)
        tally.recalls.append(exact_topk_recall(logical.expand(heads, -1), mass))
        # the oracle of this path's shape: one selection for every head, by mass summed over heads
        tally.add_oracle(config, query[0], kb, vb, n, mass.sum(dim=0, keepdim=True), len(kept), dense[0], scale)


def bench_trained_paged(
    args: Any, windows: list[list[LayerQKV]], block_size: int, decode_steps: int,
    ratios: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ratio in ratios or KEEP_RATIOS:
        config = BlockRetrievalConfig.from_dict(
            {"keep_ratio": ratio, "init_blocks": 1, "local_blocks": 2, "retrieval_stride": args.stride,
             "summary": args.summary, "min_blocks": 4}
        )
        tally = Tally()
        for w, layers in enumerate(windows):
            for lq in layers:
                run_paged(config, tally, lq, decode_steps, block_size, seed=w * 100 + lq.layer)
        out[f"keep_{ratio}"] = tally.result()
    return out
