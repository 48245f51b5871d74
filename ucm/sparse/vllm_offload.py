"""Sparse offload inside vLLM: blocks outside the windows leave the GPU once the store holds them.

Why: block retrieval reads about `keep_ratio` of a long request's blocks per decode step, yet vLLM
keeps every block on the GPU. Offload frees the others, so a request holds windows + a bounded
number of slots instead of its whole context, and the freed blocks serve other requests.

Scheduler side (`SchedulerOffload`, with vLLM's real `KVCacheManager`): at each step, for every
decode request of at least `min_blocks` blocks, the blocks outside the initial and local windows
that the store is known to hold (the connector's lookup of what it saved, or on a PD decode pod
what it loaded) are freed the way vLLM frees blocks that leave a sliding window: the request's
block list gets vLLM's null block there and the blocks return to the pool. The request instead
holds *slot* blocks from the same pool, as many as one selection can pick outside the windows
(plus `prefetch_blocks` kept for reuse), never more than it has offloaded. Only full blocks can be
in the store; with offload on the connector saves every block as it fills (generated tokens'
included, in every role), so a long request holds its windows, its slots and at most the block it
just filled.

Worker side (`WorkerOffload`): the step's metadata names, per request, the block its decode token
is written to (the `anchor`, which finds the request's row in the attention metadata, whose block
table still lists the freed ids), the blocks offloaded this step and the new slots. Before any layer
runs, the offloaded blocks' key summaries are copied out of the per-physical-block summaries (their
GPU blocks may be reused from the next step on). At attention, the row's selection is scored from
those summaries; selected offloaded blocks are placed in slots (per layer: a slot of layer L holds
some block of layer L; least recently used first), missing ones read from the store as whole
blocks (all layers; kept in a small host cache, so other layers selecting the same block do not
read it again), and the compacted block table points at the slots. A freed id never reaches the
kernel: an offloaded block is attended only through a slot. Each layer's runners-up and rising
blocks are read ahead into the host cache, so those store reads overlap the rest of the step.

An offloaded block exists only in the store while its request decodes, yet nobody reads it while it
goes unselected, and the store evicts (and `ucm store gc` removes) least recently used objects
first. So every `KEEPALIVE_S` the worker touches the objects of every block it has offloaded, in
the background: they stay among the most recently used, and one that is gone anyway is logged
before a selection needs it. A block a read finds gone is left out of that request's selections
from then on (its KV exists nowhere; failing the step would stop the engine and every request).

Limits: a block not in host memory is read on its layer's critical path; speculative decoding (a
row with several query tokens) is refused at start-up; a lost block is not recomputed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ucm.sparse import retrieval_math as rm
from ucm.sparse.base import BlockReader, PendingBlocks, SparseConfigError, StoredBlocks
from ucm.sparse.offload import OffloadError
from ucm.sparse.paged import LayerKV, PagedSummaries
from ucm.store.base import BlocksMissing, StoreError

logger = logging.getLogger(__name__)

# Seconds between touches of the offloaded blocks' objects: they are then never more than this
# much older than the newest objects, while a touch costs a metadata write per object (an NFS RPC),
# about 270 per second for a 128K-token request of 16-token blocks.
KEEPALIVE_S = 30.0
# logged at a request's first offload
FIRST_OFFLOAD_LOG = (
    "UCM sparse offload: request %s: %d of its %d blocks left the GPU (in the store); it holds %d slots for "
    "the selected ones"
)
# logged when a request's offload ends (it finished, or was preempted): the GPU blocks it held at its
# last step and at most from its first offload on, against the blocks of its whole context (what
# dense attention holds); `ucm bench sparse --serving` reads it
OFFLOAD_ENDED_LOG = (
    "UCM sparse offload: request %s: offload ended; it held %d GPU blocks at its last step (at most %d after "
    "its first offload) for a context of %d blocks"
)


@dataclasses.dataclass(frozen=True)
class OffloadedBlock:
    """A block that left the GPU this step: its position, the GPU block it held, its store hash."""

    logical: int
    physical: int
    block_hash: bytes


@dataclasses.dataclass(frozen=True)
class OffloadUpdate:
    """Per-step scheduler -> worker news of one offloading request."""

    req_id: str
    anchor: int  # physical block the decode token is written to this step: identifies the row
    offloaded: tuple[OffloadedBlock, ...] = ()
    new_slots: tuple[int, ...] = ()
    first: bool = False  # the request's first offload (since it started or was preempted): fresh state


@dataclasses.dataclass
class OffloadCounters:
    """Worker-side counters since start (bytes at the cache dtype, one layer per fetch)."""

    offloaded_blocks: int = 0
    fetched_blocks: int = 0  # (layer, block) placements into a slot
    slot_hits: int = 0  # selected offloaded (layer, block) already in a slot
    store_reads: int = 0  # whole blocks read from the store on demand (the layer waits for them)
    host_hits: int = 0  # whole blocks found in the host cache (read earlier, or prefetched and arrived)
    prefetched: int = 0  # whole blocks whose read started ahead of need
    prefetch_hits: int = 0  # ... of those, the ones a later placement used
    slot_shortfall: int = 0  # selected offloaded (layer, block) left out for want of a slot
    lost_blocks: int = 0  # offloaded blocks a read found gone from the store: left out from then on
    kept_stored: int = 0  # offloaded blocks whose stored objects were touched (see KEEPALIVE_S)
    missing_stored: int = 0  # ... of those objects, the ones found gone from the store


# OffloadCounters field -> the connector's stat name (ucm.connector.stats.COUNTERS)
STAT_NAMES = {
    "offloaded_blocks": "sparse_offloaded_blocks",
    "fetched_blocks": "sparse_slot_loads",
    "store_reads": "sparse_store_reads",
    "prefetched": "sparse_prefetched",
    "slot_shortfall": "sparse_slot_shortfall",
    "lost_blocks": "sparse_lost_blocks",
}


@dataclasses.dataclass
class _Held:
    slots: list[Any] = dataclasses.field(default_factory=list)  # vLLM KVCacheBlocks
    # blocks [init_blocks, frontier) have left the GPU: they leave in order, as they are stored
    frontier: int = 0
    offloaded: int = 0  # blocks this request's list holds as vLLM's null block (they left the GPU)
    # GPU blocks held after a step's offload (vLLM adds at most one before the next): at the latest
    # step and at most; while fewer blocks are stored than a selection's slots, each freed block
    # takes a slot, so the peak is the context until saves catch up
    last: int = 0
    peak: int = 0
    context: int = 0  # blocks of the request's context at its latest step


class SchedulerOffload:
    """Frees stored blocks of long decode requests and holds their slots (see the module docstring)."""

    def __init__(self, config: Any, block_size: int, kv_cache_manager: Any, stored: StoredBlocks) -> None:
        managers = kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1:
            raise SparseConfigError(
                f"ucm_sparse_config.offload: needs a model with one KV cache group (full attention in "
                f"every layer); this one has {len(managers)}"
            )
        self.config = config
        self.block_size = block_size
        self.manager = managers[0]
        self.pool = kv_cache_manager.block_pool
        self.stored = stored
        self.held: dict[str, _Held] = {}
        self.told: set[str] = set()  # requests the workers hold offload state for

    def plan(self, scheduler_output: Any, requests: Mapping[str, Any]) -> tuple[list[OffloadUpdate], list[str]]:
        """This step's updates, and the requests whose offload ended, for the workers to forget:
        finished (slots already released by `release`) or preempted (vLLM freed their blocks and
        will recompute or reload them)."""
        ended = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        ended |= set(getattr(scheduler_output, "finished_req_ids", None) or ())
        dropped = sorted(ended & self.told)
        for req_id in dropped:
            self.release(req_id)
            self.told.discard(req_id)
        # a request scheduled anew or resumed this step may be loading its blocks from the store in
        # it (their GPU copies and summaries exist only from the next step): it offloads from then on
        arriving = {r.req_id for r in getattr(scheduler_output, "scheduled_new_reqs", None) or ()}
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        arriving |= set(getattr(cached, "resumed_req_ids", None) or ())
        updates = []
        for req_id, count in scheduler_output.num_scheduled_tokens.items():
            request = requests.get(req_id)
            if request is None or count < 1 or req_id in arriving:
                continue
            # decode steps and prefill chunks alike: a later chunk of a long prompt attends to its
            # windows and its selection (the worker's prefill rows), so what earlier chunks stored leaves
            update = self._plan_request(request, count)
            if update is not None:
                updates.append(update)
        return updates, dropped

    def admission_blocks(self, request: Any, num_new_tokens: int) -> int:
        """Blocks a waiting request needs free to be admitted under offload (`offload_bound_blocks`
        for its prompt and first chunk): what vLLM's full-prompt admission gate asks instead."""
        return offload_bound_blocks(self.config, self.block_size, int(request.num_tokens), num_new_tokens)

    def _plan_request(self, request: Any, count: int) -> OffloadUpdate | None:
        c, req_id, bs = self.config, request.request_id, self.block_size
        nb = math.ceil((request.num_computed_tokens + count) / bs)  # blocks once this step's tokens are in
        blocks = self.manager.req_to_blocks.get(req_id)
        if blocks is None or len(blocks) < nb or nb < c.min_blocks:
            return None
        held = self.held.get(req_id)
        init_stop = min(c.init_blocks, nb)
        local_start = rm.row_local_start(nb, request.num_computed_tokens // bs, c.init_blocks, c.local_blocks)
        # only the blocks past the frontier are looked at: per step, work for the new blocks only
        start = max(init_stop, held.frontier if held else 0)
        stored = self.stored.stored_block_hashes(req_id, start)
        candidates = [i for i in range(start, min(local_start, start + len(stored))) if not blocks[i].is_null]
        num_offloaded = (held.frontier - init_stop if held else 0) + len(candidates)
        have = len(held.slots) if held else 0
        need = min(num_slots(c, nb), num_offloaded) - have  # a selection's worth + prefetch_blocks
        required = min(num_slots(c, nb) - c.prefetch_blocks, num_offloaded) - have  # a selection's worth
        returned = sum(1 for i in candidates if blocks[i].ref_cnt == 1)  # shared prefix blocks stay in use
        room = self.pool.get_num_free_blocks() + returned
        if need > room:  # the pool is short: take only what one selection needs
            need = required
        if need > room:
            candidates, need = [], 0  # no room for the slots they need: keep the blocks resident
        if held is None and not candidates:
            return None
        first = held is None
        held = self.held.setdefault(req_id, _Held())
        self.told.add(req_id)
        freed = [blocks[i] for i in candidates]
        for i in candidates:
            blocks[i] = self.pool.null_block
        if candidates:
            held.frontier = candidates[-1] + 1
            held.offloaded += len(candidates)
        self.pool.free_blocks(reversed(freed))  # later blocks first in eviction order, as vLLM frees
        slots = self.pool.get_new_blocks(need) if need > 0 else []
        held.slots.extend(slots)
        if first:
            logger.info(FIRST_OFFLOAD_LOG, req_id, len(candidates), nb, len(held.slots))
        held.last, held.context = self.gpu_blocks(req_id), nb
        held.peak = max(held.peak, held.last)
        return OffloadUpdate(
            req_id,
            anchor=blocks[nb - 1].block_id,
            offloaded=tuple(OffloadedBlock(i, b.block_id, stored[i - start])
                            for i, b in zip(candidates, freed, strict=True)),
            new_slots=tuple(b.block_id for b in slots),
            first=first,
        )

    def release(self, req_id: str) -> None:
        """Return the request's slots to the pool (finished or preempted; vLLM frees the rest)."""
        held = self.held.pop(req_id, None)
        if held is not None:
            logger.info(OFFLOAD_ENDED_LOG, req_id, held.last, held.peak, held.context)
        if held is not None and held.slots:
            self.pool.free_blocks(held.slots)

    def gpu_blocks(self, req_id: str) -> int:
        """GPU blocks the request holds now: its non-null blocks plus its slots (counted, not
        scanned: this runs every step, and a long request's list has thousands of blocks)."""
        blocks = self.manager.req_to_blocks.get(req_id, [])
        held = self.held.get(req_id)
        if held is None:
            return sum(1 for b in blocks if not b.is_null)
        return len(blocks) - held.offloaded + len(held.slots)


@dataclasses.dataclass
class _Offloaded:
    req_id: str
    hashes: dict[int, bytes] = dataclasses.field(default_factory=dict)  # logical block -> store hash
    lost: set[int] = dataclasses.field(default_factory=set)  # offloaded blocks gone from the store
    slots: list[int] = dataclasses.field(default_factory=list)
    summaries: dict[str, rm.BlockSummaries] = dataclasses.field(default_factory=dict)  # by layer, logical
    placed: dict[str, collections.OrderedDict[int, int]] = dataclasses.field(default_factory=dict)  # slot->block
    index: torch.Tensor | None = None  # sorted offloaded blocks, rebuilt only when they change


class WorkerOffload:
    """Slots, offloaded summaries and store reads of the worker's offloading requests."""

    def __init__(self, kind: str, host_cache_blocks: int, prefetch: bool = True,
                 keepalive_s: float = KEEPALIVE_S) -> None:
        self.kind = kind
        self.host_cache_blocks = host_cache_blocks
        self.prefetch_enabled = prefetch
        self.keepalive_s = keepalive_s
        self._last_keepalive = time.monotonic()
        self._keepalive: concurrent.futures.Future[int] | None = None
        self._keepalive_blocks = 0
        self._keeper: concurrent.futures.ThreadPoolExecutor | None = None
        self.reader: BlockReader | None = None
        self.requests: dict[str, _Offloaded] = {}
        self.by_anchor: dict[int, _Offloaded] = {}
        self.counters = OffloadCounters()
        self._host: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self._inflight: dict[bytes, tuple[PendingBlocks, list[bytes]]] = {}  # hash -> its read, all its hashes
        self._reported: dict[str, int] = {}  # counters at the last take_counters

    def apply(self, updates: Sequence[OffloadUpdate], dropped: Sequence[str], summaries: Mapping[str, PagedSummaries]) -> None:
        """Take in a step's updates before any layer runs: copy the offloaded blocks' summaries of
        every layer out of their GPU blocks, which the scheduler may hand out from the next step."""
        for req_id in dropped:
            self.requests.pop(req_id, None)
        self.by_anchor = {}
        for update in updates:
            if update.first or update.req_id not in self.requests:
                self.requests[update.req_id] = _Offloaded(update.req_id)
            req = self.requests[update.req_id]
            req.slots.extend(update.new_slots)
            self.by_anchor[update.anchor] = req
            if not update.offloaded:
                continue
            if self.reader is None:
                raise OffloadError("sparse offload: the connector registered no block reader on this worker")
            logical = [b.logical for b in update.offloaded]
            physical = torch.tensor([b.physical for b in update.offloaded])
            for layer, paged in summaries.items():
                store = req.summaries.get(layer)
                size = max(logical) + 1
                if store is None or store.num_blocks < size:
                    store = _grown(store, self.kind, size, paged)
                    req.summaries[layer] = store
                store.assign(torch.tensor(logical), paged.data.take(physical.to(paged.data.kmin.device)))
            req.hashes.update((b.logical, b.block_hash) for b in update.offloaded)
            req.index = None
            self.counters.offloaded_blocks += len(logical)
        self._keep_stored()

    def _keep_stored(self) -> None:
        """Every `keepalive_s`, touch the stored objects of all offloaded blocks, on a thread of
        its own (the step does not wait); the previous touch's outcome is collected first."""
        if self._keepalive is not None:
            if not self._keepalive.done():
                return
            self._collect_keepalive(self._keepalive)
        if self.reader is None or time.monotonic() - self._last_keepalive < self.keepalive_s:
            return
        hashes = [h for req in self.requests.values() for h in req.hashes.values()]
        if not hashes:
            return
        self._last_keepalive = time.monotonic()
        if self._keeper is None:
            self._keeper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ucm-sparse-keepalive")
        self._keepalive_blocks = len(hashes)
        self._keepalive = self._keeper.submit(self.reader.keep_stored, hashes)

    def _collect_keepalive(self, done: concurrent.futures.Future[int]) -> None:
        self._keepalive = None
        try:
            missing = done.result()
        except Exception:  # recency is best effort: a failed touch must not fail decoding
            logger.warning("UCM sparse offload: touching the offloaded blocks in the store failed", exc_info=True)
            return
        self.counters.kept_stored += self._keepalive_blocks
        self.counters.missing_stored += missing
        if missing:
            logger.warning(
                "UCM sparse offload: %d stored objects of offloaded blocks are gone from the store (evicted, "
                "or removed by `ucm store gc`); their requests' attention will leave them out. Give the store "
                "more capacity or gc less recently used data", missing,
            )

    def overlay(self, req: _Offloaded, layer: str, block_summaries: rm.BlockSummaries) -> None:
        """Put the offloaded blocks' own summaries into a row's summaries (whose entries for them
        were read through stale block ids)."""
        if not req.hashes:
            return
        if layer not in req.summaries:  # its summaries did not exist when the blocks left the GPU
            raise OffloadError(f"sparse offload: layer {layer} has no summaries of the offloaded blocks")
        if req.index is None or req.index.device != block_summaries.kmin.device:
            req.index = torch.tensor(sorted(req.hashes), device=block_summaries.kmin.device)
        block_summaries.assign(req.index, req.summaries[layer].take(req.index))

    def place(
        self, req: _Offloaded, layer: str, selection: torch.Tensor, physical: torch.Tensor, paged: LayerKV
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(`physical`, a row's block ids by logical block, with every selected offloaded block
        pointing at a slot of this layer that holds it; the selection attended). Loads the missing
        blocks into slots. Should the slots not suffice (the scheduler could not take more from a
        full pool while the selection grew), the last missing blocks are left out of this step's
        selection rather than failing the forward pass (`slot_shortfall` counts them). A block the
        store no longer has is left out of this and every later selection (see `_lose`)."""
        placed = req.placed.setdefault(layer, collections.OrderedDict())
        if req.lost:
            selection = selection[[b not in req.lost for b in selection.tolist()]]
        where = {block: slot for slot, block in placed.items()}
        wanted = [b for b in selection.tolist() if b in req.hashes]
        missing = [b for b in wanted if b not in where]
        self.counters.slot_hits += len(wanted) - len(missing)
        if missing:
            busy = {where[b] for b in wanted if b in where}
            free = [s for s in req.slots if s not in placed] + [s for s in placed if s not in busy]
            if len(missing) > len(free):
                left_out = set(missing[len(free) :])
                self.counters.slot_shortfall += len(left_out)
                missing, wanted = missing[: len(free)], [b for b in wanted if b not in left_out]
                selection = selection[[b not in left_out for b in selection.tolist()]]
        if missing:
            read = self._read([req.hashes[b] for b in missing])
            if any(p is None for p in read):
                self._lose(req, [b for b, p in zip(missing, read, strict=True) if p is None])
                selection = selection[[b not in req.lost for b in selection.tolist()]]
                wanted = [b for b in wanted if b not in req.lost]
                missing = [b for b in missing if b not in req.lost]
            payloads = [p for p in read if p is not None]
        if missing:
            index = self.reader.layer_of(layer) if self.reader is not None else 0
            # this layer of every missing block in one host -> device copy
            targets = torch.tensor(free[: len(missing)], device=paged.blocks.device)
            paged.write_blocks(targets, torch.stack([p[index] for p in payloads]))
            for block, slot in zip(missing, free, strict=False):
                placed.pop(slot, None)
                placed[slot] = block
                where[block] = slot
            self.counters.fetched_blocks += len(missing)
        out = physical.clone()
        for block in wanted:
            placed.move_to_end(where[block])  # most recently used last
            out[block] = where[block]
        return out, selection

    def _lose(self, req: _Offloaded, blocks: list[int]) -> None:
        """Blocks gone from the store (evicted or removed by gc although the keep-alive touched
        them, or a lost volume) cannot be attended again: their KV exists nowhere. Failing the
        step would stop the engine and every request in it; the request instead goes on without
        them, like without any other unselected block, and the loss is logged and counted
        (`vllm:ucm_sparse_lost_blocks`)."""
        new = sorted(set(blocks) - req.lost)
        req.lost.update(new)
        self.counters.lost_blocks += len(new)
        if new:
            logger.error(
                "UCM sparse offload: request %s: offloaded blocks %s are gone from the store (evicted or removed by "
                "gc); its attention leaves them out from now on. Give the store room for the blocks decoding "
                "requests have offloaded", req.req_id, new,
            )

    def take_counters(self) -> dict[str, int]:
        """What changed since the last call, by the connector's stat names."""
        now = dataclasses.asdict(self.counters)
        since = {name: now[field] - self._reported.get(field, 0) for field, name in STAT_NAMES.items()}
        self._reported = now
        return {name: value for name, value in since.items() if value}

    def prefetch(self, req: _Offloaded, layer: str, blocks: Sequence[int]) -> None:
        """Start reading offloaded `blocks` this layer may select next (its scoring's runners-up and
        rising blocks) that are neither in one of its slots, in host memory nor on their way, so the
        store read overlaps the rest of the step; at most `host_cache_blocks` reads in flight."""
        if not self.prefetch_enabled or self.reader is None:
            return
        held = set(req.placed.get(layer, {}).values())
        wanted = [req.hashes[b] for b in dict.fromkeys(blocks) if b in req.hashes and b not in held]
        wanted = [h for h in wanted if h not in self._host and h not in self._inflight]
        wanted = wanted[: max(0, self.host_cache_blocks - len(self._inflight))]
        if wanted:
            try:
                read = self.reader.start_read(wanted, ahead=True)
            except StoreError:
                return  # no buffers to spare now: a prefetch is only an optimisation
            for h in wanted:
                self._inflight[h] = (read, wanted)
            self.counters.prefetched += len(wanted)

    def _arrive(self, block_hash: bytes) -> None:
        """Wait for the prefetch bringing `block_hash`; its blocks join the host cache."""
        read, hashes = self._inflight[block_hash]
        for h in hashes:
            self._inflight.pop(h, None)
        try:
            for h, payload in zip(hashes, read.wait(), strict=True):
                self._host[h] = payload
        except StoreError:
            return  # a demand read of the block reports what is missing

    def _read(self, block_hashes: list[bytes]) -> list[torch.Tensor | None]:
        """Whole blocks by hash, from the host cache (prefetches that arrived included) or, in one
        store read for the rest, the store; None for a block the store lacks."""
        for h in dict.fromkeys(block_hashes):
            if h in self._inflight and h not in self._host:
                self._arrive(h)
                self.counters.prefetch_hits += h in self._host
        absent = [h for h in dict.fromkeys(block_hashes) if h not in self._host]
        self.counters.host_hits += len(block_hashes) - len(absent)
        if absent:
            present, loaded = self._read_store(absent)
            self.counters.store_reads += len(present)
            for h, payload in zip(present, loaded, strict=True):
                self._host[h] = payload
        out: list[torch.Tensor | None] = []
        for h in block_hashes:
            if h in self._host:
                self._host.move_to_end(h)
            out.append(self._host.get(h))
        while len(self._host) > max(self.host_cache_blocks, len(block_hashes)):
            self._host.popitem(last=False)
        return out

    def _read_store(self, block_hashes: list[bytes]) -> tuple[list[bytes], Sequence[torch.Tensor]]:
        """(the blocks the store has, their payloads): a read that finds some missing is repeated
        for the others. No staging to read into, or any other failure, is an `OffloadError`."""
        assert self.reader is not None
        try:
            try:
                return block_hashes, self.reader.start_read(block_hashes).wait().unbind(0)
            except BlocksMissing as exc:
                present = [h for h in block_hashes if h not in set(exc.block_hashes)]
                return present, self.reader.start_read(present).wait().unbind(0) if present else ()
        except StoreError as exc:
            raise OffloadError(f"sparse offload: an offloaded block cannot be read back: {exc}") from exc

    def close(self) -> None:
        """Wait for the reads in flight (they hold host staging buffers) and the touch in flight
        (the connector closes the store next)."""
        while self._inflight:
            self._arrive(next(iter(self._inflight)))
        if self._keepalive is not None:
            concurrent.futures.wait([self._keepalive])
            self._collect_keepalive(self._keepalive)
        if self._keeper is not None:
            self._keeper.shutdown(wait=True)
            self._keeper = None


def _grown(old: rm.BlockSummaries | None, kind: str, size: int, like: PagedSummaries) -> rm.BlockSummaries:
    """Logical-block summaries with room for at least `size` blocks (doubling), `old` copied in."""
    capacity = max(size, 2 * old.num_blocks if old is not None else 0, 16)
    new = rm.BlockSummaries.empty(kind, like.heads, capacity, like.head_dim, like.dtype, like.device)
    if old is not None:
        new.assign(slice(0, old.num_blocks), old)
    return new


def offload_bound_blocks(config: Any, block_size: int, num_tokens: int, chunk_tokens: int) -> int:
    """The most GPU blocks a request of `num_tokens` holds under offload, prefilled in chunks of at
    most `chunk_tokens`: its initial window, a chunk and the `local_blocks - 1` blocks before it, a
    selection's slots and the block being filled; never more than the request's own blocks."""
    c = config
    nb = math.ceil(num_tokens / block_size)
    if nb < c.min_blocks:
        return nb
    bound = int(c.init_blocks) + int(c.local_blocks) + num_slots(c, nb) + math.ceil(chunk_tokens / block_size) + 1
    return min(nb, bound)


def num_slots(config: Any, num_blocks: int) -> int:
    """Slots a request of `num_blocks` blocks holds at most (the budget of one selection outside
    the windows plus `prefetch_blocks`)."""
    c = config
    keep = rm.num_blocks_to_keep(num_blocks, c.keep_ratio, c.init_blocks, c.local_blocks)
    init, local = rm.fixed_window(num_blocks, c.init_blocks, c.local_blocks)
    return max(0, keep - len(init) - len(local)) + int(c.prefetch_blocks)
