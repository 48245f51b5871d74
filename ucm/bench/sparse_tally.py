"""What the sparse benchmarks tally per decode step against dense attention, and report.

`ucm bench sparse` (per KV head, `ucm.bench.sparse`) and its vLLM-path replay (per request row,
`ucm.bench.sparse_paged`) both accumulate a `Tally` per keep ratio, so both report the same fields.
"""

from __future__ import annotations

import math
import statistics

import torch

from ucm.bench.common import percentile
from ucm.sparse import retrieval_math as rm
from ucm.sparse.block_retrieval import BlockRetrievalConfig

KEEP_RATIOS = (0.1, 0.25, 0.5)


class Tally:
    """Accumulates per-step comparisons of a sparse run against dense attention."""

    def __init__(self) -> None:
        self.cosines: list[float] = []
        self.oracle_cosines: list[float] = []  # same number of blocks, chosen by true attention mass
        self.max_abs = 0.0
        self.recalls: list[float] = []
        self.needle_recalls: list[float] = []
        self.sparse_bytes = 0
        self.dense_bytes = 0
        self.sparse_s = 0.0
        self.dense_s = 0.0
        self.steps = 0

    def add(self, sparse_out: torch.Tensor, dense_out: torch.Tensor, heads: int) -> None:
        """Cosine per query head (the strictest grain), max abs error over everything."""
        a, b = sparse_out.float().view(heads, -1), dense_out.float().view(heads, -1)
        self.cosines.extend(torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist())
        self.max_abs = max(self.max_abs, float((a - b).abs().max()))

    def add_oracle(
        self, config: BlockRetrievalConfig, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        num_tokens: int, mass: torch.Tensor, count: int, dense_out: torch.Tensor, scale: float,
    ) -> None:
        """The oracle: `count` blocks per row of `mass` ([H, NB] per KV head, or [1, NB] for one
        selection shared by every head), windows kept, the rest by true attention mass — the best
        any selection of that size and shape could do (separates "the algorithm missed" from "too
        few blocks"). `keys`/`values` are block-major [H, NB', bs, D] with NB' >= NB."""
        forced = mass.clone()
        forced[:, : config.init_blocks] = math.inf
        forced[:, max(0, mass.shape[1] - config.local_blocks) :] = math.inf
        selection = forced.topk(count, dim=1).indices.sort(dim=1).values.expand(keys.shape[0], -1)
        oracle = rm.sparse_decode_attention(query, keys, values, num_tokens, selection, scale)
        a, b = oracle.float().view(query.shape[0], -1), dense_out.float().view(query.shape[0], -1)
        self.oracle_cosines.extend(torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist())

    def result(self) -> dict[str, float]:
        cos = sorted(self.cosines)
        return {
            "cosine_mean": round(statistics.fmean(cos), 5),
            "cosine_p1": round(percentile(cos, 0.01), 5),
            **({"oracle_cosine_mean": round(statistics.fmean(self.oracle_cosines), 5)} if self.oracle_cosines else {}),
            "max_abs_err": round(self.max_abs, 5),
            "topk_recall": round(statistics.fmean(self.recalls), 4) if self.recalls else float("nan"),
            **({"needle_recall": round(statistics.fmean(self.needle_recalls), 4)} if self.needle_recalls else {}),
            "kv_bytes_per_step": round(self.sparse_bytes / self.steps),
            "dense_kv_bytes_per_step": round(self.dense_bytes / self.steps),
            "bytes_reduction": round(self.dense_bytes / self.sparse_bytes, 2),
            "attn_ms_per_step": round(1e3 * self.sparse_s / self.steps, 3),
            "dense_attn_ms_per_step": round(1e3 * self.dense_s / self.steps, 3),
        }


def exact_topk_recall(selection: torch.Tensor, mass: torch.Tensor) -> float:
    """|selected ∩ exact top-|selected| blocks by true mass| / |selected|, averaged over KV heads."""
    k = selection.shape[1]
    exact = mass.topk(k, dim=1).indices
    hits = [len(set(selection[h].tolist()) & set(exact[h].tolist())) for h in range(selection.shape[0])]
    return sum(hits) / (k * selection.shape[0])
