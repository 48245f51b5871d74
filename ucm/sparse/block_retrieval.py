"""Block retrieval: a training-free sparse attention algorithm (blocks ranked by key summaries).

Per decode step and per KV head, attention reads the initial window (attention sinks), the local
window (recent tokens) and the top-k other blocks ranked by a per-block key summary scored against
the current query; the retrieved top-k is re-selected every `retrieval_stride` decode steps and
reused in between (the windows always follow the sequence).

Two users of the same math (`retrieval_math`):
* `DecodeLayer` — one layer of one request decoding over its own block-major K/V, optionally with
  offload to a store (`offload.ResidentBlocks`). The benchmark and the tests drive it with real
  tensors; it is the per-head selection this algorithm is defined by.
* `BlockRetrievalSparse` — the `UcmSparseBase` plugged into vLLM. Its attention hook (installed by
  `vllm_patch`) selects per request row of the paged cache and hands the attention backend a
  compacted block table (`paged.compact_decode_rows`); see that module for what runs where.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from ucm.sparse import retrieval_math as rm
from ucm.sparse.base import (
    BlockReader,
    SlotAllocation,
    SparseConfigError,
    SparseRole,
    StoredBlocks,
    UcmSparseBase,
    validate_keys,
)
from ucm.sparse.offload import OffloadError, ResidentBlocks
from ucm.sparse.paged import LayerKV, PagedSummaries, compact_decode_rows, completed_blocks, decode_rows
from ucm.sparse.vllm_offload import OffloadUpdate, SchedulerOffload, WorkerOffload

# queries of a prefill chunk (evenly spaced, the last included) whose block scores are averaged into
# the chunk's one selection: scoring every query would cost a decode step's scoring per token
PREFILL_SCORING_QUERIES = 8


@dataclasses.dataclass(frozen=True)
class BlockRetrievalConfig:
    """`ucm_sparse_config` for name="block_retrieval" (every key optional)."""

    keep_ratio: float = 0.25  # fraction of blocks attended per step (windows included)
    init_blocks: int = 1  # always-kept leading blocks (attention sinks)
    local_blocks: int = 2  # always-kept most recent blocks
    # re-select every N decode steps: 1 by default, since the query changes every token (tiny causal
    # models, 25% keep, measured with the earlier two-centre summary: cosine 0.992-0.996 at 1,
    # 0.970-0.979 at 2, 0.958-0.968 at 4)
    retrieval_stride: int = 1
    # "mass" (estimated attention share from four int8 key centres and their radii; see retrieval_math),
    # "bounds" (the Quest upper bound from per-channel min/max) or "mean" (mean key, half the bytes)
    summary: str = "mass"
    min_blocks: int = 16  # shorter contexts stay dense: there is nothing worth skipping
    resident_blocks: int | None = None  # offline offload: device slots per request-layer ((head, block) pairs)
    # offline offload: runners-up per head prefetched for the next re-selection; vLLM offload: slots
    # kept beyond one selection's need, so recently fetched blocks are reused
    prefetch_blocks: int = 2
    offload: bool = False  # vLLM: free stored blocks outside the windows, fetch selected ones (vllm_offload)
    host_cache_blocks: int = 64  # vLLM offload: whole blocks (all layers) kept in host memory after a read

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> BlockRetrievalConfig:
        section = "ucm_sparse_config"
        validate_keys(section, raw, {f.name for f in dataclasses.fields(cls)})

        def number(key: str, kind: type, lo: float, hi: float | None = None) -> Any:
            value: Any = raw.get(key, getattr(cls, key))
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
            if not ok or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
                bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise SparseConfigError(f"{section}.{key}: expected {kind.__name__} {bound}, got {value!r}")
            return kind(value)

        keep_ratio = number("keep_ratio", float, 0.0, 1.0)
        if keep_ratio <= 0:
            raise SparseConfigError(f"{section}.keep_ratio: expected a float in (0, 1], got {keep_ratio!r}")
        summary = raw.get("summary", cls.summary)
        if summary not in rm.SUMMARY_KINDS:
            raise SparseConfigError(f"{section}.summary: expected one of {rm.SUMMARY_KINDS}, got {summary!r}")
        offload = raw.get("offload", cls.offload)
        if not isinstance(offload, bool):
            raise SparseConfigError(f"{section}.offload: expected true or false, got {offload!r}")
        resident = raw.get("resident_blocks")
        if resident is not None and (not isinstance(resident, int) or isinstance(resident, bool) or resident < 1):
            raise SparseConfigError(f"{section}.resident_blocks: expected null or int >= 1, got {resident!r}")
        return cls(
            keep_ratio=keep_ratio,
            init_blocks=number("init_blocks", int, 0),
            local_blocks=number("local_blocks", int, 1),
            retrieval_stride=number("retrieval_stride", int, 1),
            summary=str(summary),
            min_blocks=number("min_blocks", int, 1),
            resident_blocks=resident,
            prefetch_blocks=number("prefetch_blocks", int, 0),
            offload=offload,
            host_cache_blocks=number("host_cache_blocks", int, 1),
        )


@dataclasses.dataclass
class Retrieval:
    """The reusable part of a selection: top-k per head and the prefetch candidates."""

    blocks: torch.Tensor  # [H, k], sorted by block index
    runners_up: torch.Tensor  # [H, p], next best after the top-k, best first
    trending: torch.Tensor  # [H, p'], other blocks whose score rose most since the previous scoring
    scores: torch.Tensor  # [H, NB] the scores this retrieval was made from
    age: int = 0  # decode steps served since it was scored


class RetrievalState:
    """Stride bookkeeping for one (request, layer): when to re-score, what to reuse meanwhile."""

    def __init__(self, config: BlockRetrievalConfig) -> None:
        self.config = config
        self.retrieval: Retrieval | None = None
        self.scorings = 0

    def needs_scores(self, num_blocks: int) -> bool:
        """Whether this step re-selects (so the caller must compute block scores)."""
        if num_blocks < self.config.min_blocks:
            return False
        return self.retrieval is None or self.retrieval.age >= self.config.retrieval_stride

    def select(
        self, scores: torch.Tensor | None, num_blocks: int, num_heads: int, device: torch.device | None = None
    ) -> torch.Tensor:
        """[H, K] selection for this step; `scores` [H, num_blocks] is required iff `needs_scores`."""
        c = self.config
        if num_blocks < c.min_blocks:
            return torch.arange(num_blocks, device=device).expand(num_heads, -1)
        if scores is not None:
            init, local, k = self._layout(num_blocks)
            ranked = rm.rank_middle(scores, init.stop, local.start, k + c.prefetch_blocks)
            trending = self._trending(scores, ranked, init.stop, local.start)
            self.retrieval = Retrieval(ranked[:, :k].sort(dim=1).values, ranked[:, k:], trending, scores)
            self.scorings += 1
        if self.retrieval is None:
            raise ValueError("block retrieval: the first sparse step needs block scores")
        self.retrieval.age += 1
        return rm.compose_selection(self.retrieval.blocks, num_blocks, c.init_blocks, c.local_blocks)

    def shared_scores(self, query: torch.Tensor, summaries: rm.BlockSummaries, num_blocks: int) -> torch.Tensor:
        """[1, num_blocks] scores for one selection shared by every KV head (see `rm.shared_block_scores`)."""
        init, local, count = self._layout(num_blocks)
        return rm.shared_block_scores(query, summaries, self.config.summary, init.stop, local.start, count)

    def _layout(self, num_blocks: int) -> tuple[range, range, int]:
        """The fixed windows and how many middle blocks a selection retrieves."""
        c = self.config
        keep = rm.num_blocks_to_keep(num_blocks, c.keep_ratio, c.init_blocks, c.local_blocks)
        init, local = rm.fixed_window(num_blocks, c.init_blocks, c.local_blocks)
        return init, local, keep - len(init) - len(local)

    def _trending(self, scores: torch.Tensor, ranked: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """[H, p] middle blocks outside `ranked` whose score rose most since the last scoring
        (positive rises only; empty on the first scoring)."""
        p = self.config.prefetch_blocks
        prev = self.retrieval.scores if self.retrieval is not None else None
        if not p or prev is None or prev.shape[0] != scores.shape[0]:
            return scores.new_empty(scores.shape[0], 0, dtype=torch.long)
        span = min(prev.shape[1], hi) - lo
        if span <= 0:
            return scores.new_empty(scores.shape[0], 0, dtype=torch.long)
        rise = scores[:, lo : lo + span] - prev[:, lo : lo + span]
        taken = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, ranked, True)
        rise = rise.masked_fill(taken[:, lo : lo + span], -math.inf)  # already candidates
        top = rise.topk(min(p, span), dim=1)
        return torch.where(top.values > 0, top.indices + lo, -1)

    def prefetch_candidates(self) -> list[tuple[int, int]]:
        """(head, block) pairs likely selected at the next re-selection: the runners-up of the last
        scoring, then the blocks whose score is trending up."""
        if self.retrieval is None:
            return []
        pairs = [(h, b) for h, row in enumerate(self.retrieval.runners_up.tolist()) for b in row]
        pairs += [(h, b) for h, row in enumerate(self.retrieval.trending.tolist()) for b in row if b >= 0]
        return pairs


@dataclasses.dataclass
class StepReport:
    """What one decode step of one layer read (bytes at the K/V tensors' dtype)."""

    selection: torch.Tensor  # [H, K] block indices attended
    kv_bytes: int  # K and V bytes attention read
    summary_bytes: int  # summary bytes scoring read (0 on steps that reuse the retrieval)
    fetched_bytes: int  # offload: store -> device bytes fetched on demand for this step
    rescored: bool


class DecodeLayer:
    """One layer of one request decoding with block retrieval, over block-major K/V it owns.

    Without offload the K/V live in `keys`/`values` (the device cache); with `offload`, attention
    reads only from the resident pool, which fetches selected blocks from the store on demand.
    """

    def __init__(
        self,
        config: BlockRetrievalConfig,
        *,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        max_tokens: int,
        scale: float,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        offload: ResidentBlocks | None = None,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.scale = scale
        nb = math.ceil(max_tokens / block_size)
        shape = (num_kv_heads, nb, block_size, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._summaries = rm.BlockSummaries.empty(config.summary, num_kv_heads, nb, head_dim, dtype, device)
        self.num_tokens = 0
        self.state = RetrievalState(config)
        self.offload = offload

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_tokens / self.block_size)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add tokens' K and V ([n, H, D], token-major as vLLM produces them); the summaries of every
        touched block are recomputed (a partial block's summary covers its valid tokens only)."""
        n = keys.shape[0]
        start, end = self.num_tokens, self.num_tokens + n
        if end > self.keys.shape[1] * self.block_size:
            raise ValueError(f"DecodeLayer: {end} tokens exceed max_tokens {self.keys.shape[1] * self.block_size}")
        heads, nb, bs, d = self.keys.shape
        self.keys.view(heads, nb * bs, d)[:, start:end] = keys.transpose(0, 1)
        self.values.view(heads, nb * bs, d)[:, start:end] = values.transpose(0, 1)
        self.num_tokens = end
        first, last = start // bs, math.ceil(end / bs)
        touched = rm.build_block_summaries(self.keys[:, first:last], end - first * bs, self.config.summary)
        self._summaries.assign(slice(first, last), touched)

    def summaries(self) -> rm.BlockSummaries:
        return self._summaries.take(slice(0, self.num_blocks))

    def step(self, query: torch.Tensor) -> tuple[torch.Tensor, StepReport]:
        """Attention output [Hq, D] of one decode query, and what the step read."""
        nb, heads = self.num_blocks, self.keys.shape[0]
        summary_bytes = 0
        scores = None
        if self.state.needs_scores(nb):
            summaries = self.summaries()
            scores = rm.score_blocks(query, summaries, self.config.summary, self.scale)
            summary_bytes = summaries.nbytes(self.config.summary)
        selection = self.state.select(scores, nb, heads, self.keys.device)
        kv_bytes = rm.kv_bytes_of_blocks(selection, self.keys, self.num_tokens)
        fetched = 0
        if self.offload is None:
            out = rm.sparse_decode_attention(query, self.keys, self.values, self.num_tokens, selection, self.scale)
        else:
            before = self.offload.stats.fetched_bytes
            self.offload.ensure(selection)
            fetched = self.offload.stats.fetched_bytes - before
            k_sel, v_sel = self.offload.gather(selection)
            out = rm.attention_over_gathered(query, k_sel, v_sel, selection, self.num_tokens, self.scale)
            if self.config.prefetch_blocks:
                self.offload.prefetch(self.state.prefetch_candidates())
        return out, StepReport(selection, kv_bytes, summary_bytes, fetched, scores is not None)


@dataclasses.dataclass(frozen=True)
class BlockRetrievalMeta:
    """Per-step scheduler -> worker metadata: physical blocks newly assigned to requests this step
    (new requests, grown requests). Their content may have been written without passing through
    attention (a connector load, a prefix-cache hit), so the worker refreshes their summaries."""

    fresh_blocks: tuple[int, ...] = ()
    offload: tuple[OffloadUpdate, ...] = ()  # requests whose stored blocks left the GPU (config.offload)
    dropped: tuple[str, ...] = ()  # ... and those whose offload ended (preempted)


def _block_ids_of(scheduler_output: Any) -> list[int]:
    """Block ids of every new request and every newly allocated block of running ones (all groups)."""
    ids: list[int] = []
    for req in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
        for group in req.block_ids or ():
            ids.extend(group)
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    for groups in getattr(cached, "new_block_ids", ()) or ():
        for group in groups or ():
            ids.extend(group)
    return ids


class BlockRetrievalSparse(UcmSparseBase):
    """Block retrieval plugged into vLLM (scheduler and worker roles)."""

    name = "block_retrieval"
    config: BlockRetrievalConfig

    @classmethod
    def parse_config(cls, raw: Mapping[str, object]) -> BlockRetrievalConfig:
        return BlockRetrievalConfig.from_dict(raw)

    def __init__(self, config: BlockRetrievalConfig, role: SparseRole, vllm_config: Any = None) -> None:
        super().__init__(config, role, vllm_config)
        cache_config = getattr(vllm_config, "cache_config", None)
        self.block_size = int(getattr(cache_config, "block_size", None) or 16)
        self.requests: set[str] = set()
        self.layer_names: list[str] = []
        self._summaries: dict[str, PagedSummaries] = {}
        self._fresh: dict[str, set[int]] = {}
        # stride state per (layer, physical block being written): identifies a decode row for as
        # long as it writes into one block, without needing the worker's request order
        self._states: dict[tuple[str, int], RetrievalState] = {}
        self._seen: set[tuple[str, int]] = set()
        self.steps = 0
        self.live: dict[str, Any] = {}  # scheduler: vLLM requests by id (offload plans from their progress)
        self.scheduler_offload: SchedulerOffload | None = None
        if config.offload and getattr(vllm_config, "speculative_config", None) is not None:
            raise SparseConfigError(
                "ucm_sparse_config.offload: speculative decoding is configured, but offload needs every "
                "decode row to be one token (a verified draft reads the blocks that left the GPU)"
            )
        self.worker_offload = (
            WorkerOffload(config.summary, config.host_cache_blocks, prefetch=config.prefetch_blocks > 0)
            if config.offload else None
        )

    # ---------------------------------------------------------------- scheduler side
    def request_begin(self, request: Any) -> None:
        self.requests.add(str(request.request_id))
        self.live[str(request.request_id)] = request

    def request_finished(self, request: Any) -> None:
        self.requests.discard(str(request.request_id))
        self.live.pop(str(request.request_id), None)
        if self.scheduler_offload is not None:
            self.scheduler_offload.release(str(request.request_id))

    def bind_kv_cache_manager(self, kv_cache_manager: Any, stored: StoredBlocks) -> None:
        if self.config.offload:
            self.scheduler_offload = SchedulerOffload(self.config, self.block_size, kv_cache_manager, stored)
            # admission counts what a request holds under offload, not its whole prompt
            from ucm.sparse.vllm_patch import install_admission_gate  # function-level: vLLM-specific

            install_admission_gate(kv_cache_manager, self.scheduler_offload.admission_blocks)

    def estimate_num_slots(self, request: Any, num_tokens: int) -> int:
        """Token slots a decode step of this request attends to: the kept blocks (windows included)."""
        nb = math.ceil(num_tokens / self.block_size)
        if nb < self.config.min_blocks:
            return num_tokens
        c = self.config
        keep = rm.num_blocks_to_keep(nb, c.keep_ratio, c.init_blocks, c.local_blocks) + c.prefetch_blocks
        return min(num_tokens, keep * self.block_size)

    def allocate_slots(self, request_id: str, num_blocks: int) -> SlotAllocation:
        """Blocks that must stay resident whatever the query: the initial and local windows."""
        if num_blocks < self.config.min_blocks:
            return SlotAllocation(request_id, num_blocks, tuple(range(num_blocks)))
        init, local = rm.fixed_window(num_blocks, self.config.init_blocks, self.config.local_blocks)
        return SlotAllocation(request_id, num_blocks, (*init, *local))

    def build_sparse_meta(self, scheduler_output: Any) -> BlockRetrievalMeta:
        fresh = tuple(sorted(set(_block_ids_of(scheduler_output))))
        if self.scheduler_offload is None:
            if self.config.offload:
                raise OffloadError("sparse offload: the connector did not bind vLLM's KV cache manager")
            return BlockRetrievalMeta(fresh)
        updates, dropped = self.scheduler_offload.plan(scheduler_output, self.live)
        return BlockRetrievalMeta(fresh, tuple(updates), tuple(dropped))

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        self.layer_names = list(kv_caches)

    def register_block_reader(self, reader: BlockReader) -> None:
        if self.worker_offload is not None:
            self.worker_offload.reader = reader

    def execute_begin(self, sparse_meta: object | None) -> None:
        self.steps += 1
        self._seen.clear()
        fresh = set(sparse_meta.fresh_blocks) if isinstance(sparse_meta, BlockRetrievalMeta) else set()
        for layer in self._summaries:
            self._fresh[layer] = set(fresh)
        self._pending_fresh = fresh
        if self.worker_offload is not None and isinstance(sparse_meta, BlockRetrievalMeta):
            self.worker_offload.apply(sparse_meta.offload, sparse_meta.dropped, self._summaries)

    def attention_begin(self, layer_name: str, query: torch.Tensor, paged: Any, attn_metadata: Any) -> Any:
        """Select blocks for every decode row and return metadata with compacted rows (see `paged`)."""
        if not isinstance(paged, LayerKV) or not hasattr(attn_metadata, "block_table"):
            return attn_metadata
        bs = paged.block_size
        summaries = self._summaries.get(layer_name)
        if summaries is None:
            summaries = self._summaries[layer_name] = PagedSummaries(paged, self.config.summary)
            self._fresh[layer_name] = set(getattr(self, "_pending_fresh", set()))
        fresh = self._fresh.pop(layer_name, set())
        dirty = completed_blocks(attn_metadata, bs)
        if fresh:
            dirty = torch.unique(torch.cat([dirty, torch.tensor(sorted(fresh), device=dirty.device)]))
        summaries.refresh(paged, dirty)
        selections: dict[int, torch.Tensor] = {}
        # one device->host copy per metadata field, not one per row (each is a sync on a GPU)
        seq_lens = attn_metadata.seq_lens.tolist()
        qsl = attn_metadata.query_start_loc.tolist()
        rows = [r for r in decode_rows(attn_metadata) if math.ceil(seq_lens[r] / bs) >= self.config.min_blocks]
        offload = self.worker_offload
        anchors = dict(offload.by_anchor) if offload is not None else {}
        placed: dict[int, torch.Tensor] = {}
        table = attn_metadata.block_table
        if anchors:  # prefill chunks of offloading requests: their earlier blocks left, they attend sparsely
            decoding = set(rows)
            chunks = [r for r in range(len(qsl) - 1) if r not in decoding and qsl[r + 1] > qsl[r]]
            ends = self._last_physical(table, chunks, seq_lens, bs)
            for row, last in zip(chunks, ends, strict=True):
                held = anchors.pop(int(last), None)
                if held is not None:
                    selections[row], placed[row] = self._prefill_selection(
                        layer_name, query[qsl[row] : qsl[row + 1]], table[row], seq_lens[row], summaries, held, paged)
        last_physical = self._last_physical(table, rows, seq_lens, bs)
        for row, last in zip(rows, last_physical, strict=True):
            nb = math.ceil(seq_lens[row] / bs)
            physical = table[row, :nb].long()
            key = (layer_name, int(last))
            self._seen.add(key)
            state = self._states.setdefault(key, RetrievalState(self.config))
            held = anchors.pop(int(last), None)
            scores = None
            if state.needs_scores(nb):
                q = query[qsl[row]].view(-1, query.shape[-1])
                block_summaries = summaries.of(physical)
                if held is not None and offload is not None:
                    offload.overlay(held, layer_name, block_summaries)
                scores = state.shared_scores(q, block_summaries, nb)
            selections[row] = state.select(scores, nb, 1, physical.device)[0]
            if held is not None and offload is not None:
                placed[row], selections[row] = offload.place(held, layer_name, selections[row], physical, paged)
                offload.prefetch(held, layer_name, [b for _, b in state.prefetch_candidates()])
        if anchors:  # an offloading request whose row is not in the batch would read freed blocks
            raise OffloadError(
                f"sparse offload: {len(anchors)} offloading request(s) have no row in this batch's metadata"
            )
        return compact_decode_rows(attn_metadata, selections, bs, placed)

    @staticmethod
    def _last_physical(table: torch.Tensor, rows: list[int], seq_lens: list[int], bs: int) -> list[int]:
        """Each row's physical block of its last token (one device->host copy for all rows)."""
        if not rows:
            return []
        index = torch.tensor([math.ceil(seq_lens[r] / bs) - 1 for r in rows], device=table.device, dtype=torch.long)
        result: list[int] = table[torch.tensor(rows, device=table.device, dtype=torch.long), index].tolist()
        return result

    def _prefill_selection(
        self, layer_name: str, queries: torch.Tensor, table_row: torch.Tensor, seq_len: int,
        summaries: PagedSummaries, held: Any, paged: LayerKV,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected logical blocks, the row's block ids with offloaded ones in slots) for a prefill
        chunk of an offloading request: the initial window, the chunk's own blocks and the
        `local_blocks - 1` before them (`rm.row_local_start`), and the middle blocks a few of the
        chunk's queries score best on average, as many as a decode step selects (the slots the
        scheduler holds are sized for that). Every query of the chunk attends to that one selection."""
        c, bs = self.config, paged.block_size
        nb = math.ceil(seq_len / bs)
        physical = table_row[:nb].long()
        init_stop = min(c.init_blocks, nb)
        local_start = rm.row_local_start(nb, (seq_len - queries.shape[0]) // bs, c.init_blocks, c.local_blocks)
        keep = rm.num_blocks_to_keep(nb, c.keep_ratio, c.init_blocks, c.local_blocks)
        count = max(0, keep - init_stop - c.local_blocks)
        block_summaries = summaries.of(physical)
        offload = self.worker_offload
        assert offload is not None
        offload.overlay(held, layer_name, block_summaries)
        picks = torch.linspace(0, queries.shape[0] - 1, min(PREFILL_SCORING_QUERIES, queries.shape[0])).round().long()
        scores = sum(
            rm.shared_block_scores(queries[int(t)].view(-1, queries.shape[-1]), block_summaries, c.summary,
                                   init_stop, local_start, count)
            for t in picks.tolist()
        )
        assert isinstance(scores, torch.Tensor)
        middle = rm.rank_middle(scores, init_stop, local_start, count)[0].to(torch.long)
        fixed = torch.tensor([*range(init_stop), *range(local_start, nb)], dtype=torch.long, device=middle.device)
        selection = torch.cat([fixed, middle]).sort().values.to(physical.device)
        placed, selection = offload.place(held, layer_name, selection, physical, paged)
        return selection, placed

    @property
    def offloads_to_store(self) -> bool:
        return self.config.offload

    def take_counters(self) -> dict[str, int]:
        return self.worker_offload.take_counters() if self.worker_offload is not None else {}

    @property
    def offloading(self) -> bool:
        return self.worker_offload is not None and bool(self.worker_offload.requests)

    def close(self) -> None:
        if self.worker_offload is not None:
            self.worker_offload.close()

    def execute_finished(self) -> None:
        """Forget stride state of rows not decoded in this step (finished or moved to a new block)."""
        for key in [k for k in self._states if k not in self._seen]:
            del self._states[key]
