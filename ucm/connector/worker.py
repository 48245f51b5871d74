"""Worker side of the UCM connector: store I/O for the blocks the scheduler planned, per TP rank.

Loads (`start_load`): each rank reads the objects of the head groups it owns into pinned host
payloads; a sync load waits for the read, then copies layer by layer (`wait_layer` makes only that
layer's attention wait). An async load is polled in `poll_finished` and reported to vLLM as
finished receiving. Blocks whose objects are missing or damaged are never scattered: their ids go
to `take_load_errors`, vLLM recomputes them, and saves of the affected request are dropped for the
step (its later blocks were computed from KV that is now known to be wrong).

Saves: `save_layer` starts the copy of each layer as attention finishes it; `finish_step` completes
the copies, repacks per head group and hands the payloads to the store's asynchronous dump, whose
completion is polled at later steps (the host buffers return to the bounded pool then).

Finish saves (blocks of finished requests, generated tokens included): their KV is complete, so
`poll_finished` (vLLM's get_finished, called every step with or without a forward pass) gathers all
layers at once and hands them to the store. A request is reported as finished sending once its dump
completed (or could not be staged: a skipped save is a future miss, while blocks never reported
would leak) and vLLM has named it among the finished requests; every rank reports it, since vLLM
frees the blocks only when all ranks have.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from ucm.connector.heads import HeadPlan
from ucm.connector.layouts import detect_layout
from ucm.connector.metadata import LoadSpec, SaveSpec, UCMConnectorMetadata
from ucm.connector.stats import UCMConnectorStats, store_gauges
from ucm.hashing import block_key
from ucm.store.base import BlockLayout, BlocksMissing, Store, StoreError, Task, WritableBuffer
from ucm.transfer.buffers import HostBufferPool, PoolExhausted
from ucm.transfer.paged import PagedKV
from ucm.transfer.staging import HeadGroup, HostPayload, LoadBatch, SaveBatch

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

STAGING_HINT = "the UCM_HOST_STAGING_BYTES environment variable"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What the attention spec says about this worker's cache (used to check tensor shapes)."""

    num_blocks: int
    block_size: int
    num_heads: int  # KV heads in this rank's cache
    head_size: int
    head_size_v: int
    is_mla: bool


def _layer_order(name: str) -> tuple[int, str]:
    match = re.search(r"\d+", name)
    return (int(match.group()) if match else -1, name)


@dataclasses.dataclass
class _PendingLoad:
    spec: LoadSpec
    task: Task
    payload: HostPayload
    started: float


@dataclasses.dataclass
class _PendingDump:
    task: Task
    payload: HostPayload
    started: float
    nbytes: int
    blocks: int
    finished_reqs: tuple[str, ...] = ()  # finish saves: reported as finished sending once done


class _SparseBlockRead:
    """Whole blocks read for sparse offload: [n, layers, local heads, block_size, states, head]."""

    def __init__(self, hashes: list[bytes], group_keys: list[tuple[int, int]], task: Task, payload: HostPayload):
        self.hashes, self.group_keys, self.task, self.payload = hashes, group_keys, task, payload
        self.result: torch.Tensor | StoreError | None = None

    def wait(self) -> torch.Tensor:
        if self.result is None:
            n = len(self.hashes)
            try:
                found = self.task.wait()
                missing = found.index(False) if not all(found) else -1
                if missing >= 0:
                    start, count = self.group_keys[missing // n]
                    gone = dict.fromkeys(self.hashes[i % n] for i, hit in enumerate(found) if not hit)
                    self.result = BlocksMissing(
                        f"block {self.hashes[missing % n].hex()} (heads {start}..{start + count - 1}) is missing "
                        f"or damaged in the store", list(gone),
                    )
                else:  # [groups, n, layers, group heads, ...] -> [n, layers, local heads, ...]
                    blocks = self.payload.tensor.movedim(0, 2)
                    self.result = blocks.reshape(n, blocks.shape[1], -1, *blocks.shape[4:]).clone()
            finally:
                self.payload.release()
        if isinstance(self.result, StoreError):
            raise self.result
        return self.result


class UCMWorkerSide:
    def __init__(
        self,
        *,
        store: Store,
        heads: HeadPlan,
        can_save: bool,
        layerwise_save: bool,
        pool: HostBufferPool,
        sparse: Any = None,
    ) -> None:
        self.store = store
        self.heads = heads
        self.can_save = can_save and heads.writes
        self.layerwise_save = layerwise_save
        self.pool = pool
        self.sparse = sparse
        self.stats = UCMConnectorStats()
        self._gauges_sent: dict[str, float] | None = None  # the store footprint last reported
        self.paged: PagedKV | None = None
        self.layer_index: dict[str, int] = {}
        self.layout: BlockLayout | None = None
        self._groups: list[HeadGroup] = []  # local head offsets
        self._group_keys: list[tuple[int, int]] = []  # global (start, count) for the keys
        self._meta: UCMConnectorMetadata | None = None
        self._loads: list[tuple[LoadBatch, HostPayload]] = []
        self._async: dict[str, _PendingLoad] = {}
        self._save: SaveBatch | None = None
        self._save_specs: list[SaveSpec] = []
        self._save_started = 0.0
        self._save_skipped = False
        self._dumps: list[_PendingDump] = []
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._finished_recving: set[str] = set()
        self._finish_handled = False  # this step's finish saves were handed to the store
        self._sending: set[str] = set()  # finish saves not yet reported to vLLM
        self._sent: set[str] = set()  # ... of those, the ones whose dump is over
        self._released: set[str] = set()  # ... of those, the ones vLLM named as finished

    # ---- set-up --------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor], spec: CacheSpec) -> None:
        names = sorted(kv_caches, key=_layer_order)
        layouts = {
            detect_layout(
                tuple(kv_caches[n].shape), num_blocks=spec.num_blocks, block_size=spec.block_size,
                num_heads=spec.num_heads, head_size=spec.head_size, head_size_v=spec.head_size_v,
                is_mla=spec.is_mla, layer_name=n,
            )
            for n in names
        }
        if len(layouts) != 1:
            raise ValueError(f"UCM: layers use different KV layouts {sorted(x.name for x in layouts)}")
        if spec.num_heads != self.heads.local_count:
            raise ValueError(
                f"UCM: this rank's cache holds {spec.num_heads} KV heads but the TP plan expects "
                f"{self.heads.local_count} (of {self.heads.total_heads})"
            )
        layout = layouts.pop()
        self.paged = PagedKV([kv_caches[n] for n in names], layout, spec.head_size)
        self.layer_index = {n: i for i, n in enumerate(names)}
        self._groups = [HeadGroup(local, count) for _, count, local in self.heads.groups()]
        self._group_keys = [(start, count) for start, count, _ in self.heads.groups()]
        shape = self.paged.payload_shape(self.heads.group_size)
        self.layout = BlockLayout(str(self.paged.dtype).removeprefix("torch."), shape, self.paged.dtype.itemsize)
        logger.info(
            "UCM: %d layers, layout %s, heads %d..%d of %d in groups of %d, payload %s (%d bytes)%s",
            len(names), layout.name, self.heads.local_start, self.heads.local_start + self.heads.local_count - 1,
            self.heads.total_heads, self.heads.group_size, self.layout.describe(), self.layout.nbytes,
            "" if self.heads.writes else " (replica: reads only)",
        )
        if self.sparse is not None:
            self.sparse.register_kv_caches(dict(kv_caches))
            self.sparse.register_block_reader(self)

    def layer_of(self, layer_name: str) -> int:
        """Index of a layer in the read blocks' layer dimension (sparse offload's `BlockReader`)."""
        return self.layer_index[layer_name]

    def start_read(self, block_hashes: Sequence[bytes], ahead: bool = False) -> _SparseBlockRead:
        """Start reading whole stored blocks of this rank's heads (sparse offload's `BlockReader`).
        A read `ahead` of need does not wait for host staging; either kind that cannot get it is a
        `StoreError` (the caller skips a prefetch, and reports a demand read)."""
        assert self.layout is not None
        try:
            payload = self._payload(len(block_hashes), 0.0 if ahead else "default")
        except (PoolExhausted, ValueError) as exc:
            raise StoreError(f"no host staging for {len(block_hashes)} blocks: {exc} (raise {STAGING_HINT})") from exc
        try:
            task = self.store.load(self._keys(block_hashes), payload.block_buffers(), self.layout)
        except BaseException:
            payload.release()
            raise
        return _SparseBlockRead(list(block_hashes), self._group_keys, task, payload)

    def keep_stored(self, block_hashes: Sequence[bytes]) -> int:
        """Touch the blocks' objects of this rank's heads (sparse offload's `BlockReader`)."""
        keys = self._keys(block_hashes)
        return len(keys) - self.store.touch(keys)

    def _keys(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Keys group-major: all blocks of group 0, then group 1, ... (matching payload order)."""
        return [block_key(h, start, count) for start, count in self._group_keys for h in hashes]

    def _payload(self, n: int, timeout: float | str | None = "default") -> HostPayload:
        assert self.paged is not None
        shape = self.paged.payload_shape(self.heads.group_size)
        return HostPayload(self.pool, len(self._groups), n, shape, self.paged.dtype, timeout)

    # ---- per step ------------------------------------------------------------------------------

    def bind(self, meta: UCMConnectorMetadata | None) -> None:
        """This step's plan (None once vLLM clears it, so a stray hook never replays a step)."""
        self._meta = meta
        self._finish_handled = False
        if meta is not None and self.sparse is not None:
            # here, not in start_load: vLLM 0.32 starts loads after launching the forward pass when
            # none is synchronous, and sparse attention needs the step's metadata before layer 0
            self.sparse.execute_begin(meta.sparse_meta)

    def start_load(self) -> None:
        meta = self._meta
        if meta is None or self.paged is None:
            return
        for spec in meta.loads:
            if not spec.block_ids:
                continue
            try:
                pending = self._submit_load(spec)
            except (ValueError, PoolExhausted) as exc:  # host staging cannot hold it: recompute
                logger.warning("UCM: request %s: cannot stage %d blocks for loading (%s); recomputing",
                               spec.req_id, len(spec.block_ids), exc)
                self._load_errors.update(spec.block_ids)
                self.stats.add("load_failures", len(spec.block_ids))
                if spec.is_async:
                    self._finished_recving.add(spec.req_id)
                continue
            if spec.is_async:
                self._async[spec.req_id] = pending
            else:
                self._complete_load(pending, sync=True)

    def _submit_load(self, spec: LoadSpec) -> _PendingLoad:
        assert self.layout is not None
        payload = self._payload(len(spec.block_ids))
        task = self.store.load(self._keys(spec.block_hashes), payload.block_buffers(), self.layout)
        return _PendingLoad(spec, task, payload, time.perf_counter())

    def _complete_load(self, pending: _PendingLoad, *, sync: bool) -> None:
        """Scatter the blocks that loaded; remember the ones that did not."""
        assert self.paged is not None and self.layout is not None
        spec, n = pending.spec, len(pending.spec.block_ids)
        results = pending.task.wait()
        ok = [all(results[g * n + i] for g in range(len(self._groups))) for i in range(n)]
        good = [i for i in range(n) if ok[i]]
        if len(good) < n:
            failed = [spec.block_ids[i] for i in range(n) if not ok[i]]
            self._load_errors.update(failed)
            self._failed_reqs.add(spec.req_id)
            self.stats.add("load_failures", len(failed))
            logger.warning("UCM: request %s: %d of %d blocks failed to load; vLLM recomputes them",
                           spec.req_id, len(failed), n)
        source = pending.payload.tensor if len(good) == n else pending.payload.tensor[:, good]
        batch = LoadBatch(self.paged, [spec.block_ids[i] for i in good], self._groups, source)
        batch.start()
        if sync:
            self._loads.append((batch, pending.payload))
        else:
            batch.finish()
            pending.payload.release()
        self.stats.add("loaded_blocks", len(good))
        self.stats.add("loaded_bytes", len(good) * len(self._groups) * self.layout.nbytes)
        self.stats.add("load_seconds", time.perf_counter() - pending.started)

    def wait_layer(self, layer_name: str) -> None:
        idx = self.layer_index.get(layer_name)
        if idx is not None:
            for batch, _ in self._loads:
                batch.wait_layer(idx)
        if self.sparse is not None:
            self.sparse.layer_begin(layer_name)

    def save_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        if self.sparse is not None:
            self.sparse.layer_finished(layer_name, kv_layer)
        idx = self.layer_index.get(layer_name)
        if idx is None or not self.layerwise_save:
            return
        batch = self._save_batch()
        if batch is not None:
            self._save_or_drop(batch.save_layer, idx)

    def _save_batch(self) -> SaveBatch | None:
        if self._save is not None:
            return self._save
        meta = self._meta
        if meta is None or self.paged is None or not self.can_save or not meta.saves:
            return None
        if self._save_skipped:
            return None
        self._save_specs = [s for s in meta.saves if s.block_ids]
        block_ids = [b for s in self._save_specs for b in s.block_ids]
        if not block_ids:
            return None
        copies = 2 if self.layerwise_save else 1  # layer-major staging + per-group payloads
        needed = copies * len(block_ids) * self.paged.block_nbytes(self.heads.local_count)
        if needed > self.pool.capacity_bytes:
            logger.warning(
                "UCM: not saving %d blocks this step: they need %d bytes of host staging, more than the "
                "%d bytes allowed (raise %s)", len(block_ids), needed, self.pool.capacity_bytes, STAGING_HINT,
            )
            self._save_skipped = True
            return None
        self._save = SaveBatch(self.paged, block_ids, self._groups, self.pool, layerwise=self.layerwise_save)
        self._save_started = time.perf_counter()
        return self._save

    def finish_step(self) -> None:
        """End of the forward pass: loads complete, this step's saves handed to the store."""
        for load, payload in self._loads:
            load.finish()
            payload.release()
        self._loads.clear()
        save = self._save_batch()
        if save is not None:
            self._save_or_drop(self._dump, save)
        self._save = None
        self._save_skipped = False
        self._save_specs = []
        self._failed_reqs.clear()
        self._poll_dumps(block=False)
        if self.sparse is not None:
            self.sparse.execute_finished()
            for name, value in self.sparse.take_counters().items():
                self.stats.add(name, value)

    def _report_store_gauges(self) -> None:
        """Feed the store's footprint (StoreStats: a lock and a copy, no I/O) to this step's stats
        when it changed, so the operator can put capacity, usage and read-only in the UCMCluster
        status from vLLM's own /metrics (docs/metrics.md); an idle step ships nothing."""
        gauges = store_gauges(self.store.stats())
        if gauges != self._gauges_sent:
            self._gauges_sent = gauges
            self.stats.set_gauges(gauges)

    def _save_or_drop(self, step: Callable[[_T], object], arg: _T) -> None:
        """One step of this step's save; when host staging runs out, the save is dropped."""
        try:
            step(arg)
        except PoolExhausted as exc:
            self._drop_save(exc)

    def _drop_save(self, exc: Exception) -> None:
        """Host staging ran out (dumps still in flight hold it): skip this step's save, never stall."""
        logger.warning("UCM: skipping this step's save: %s", exc)
        if self._save is not None:
            self._save.abandon()
        self._save = None
        self._save_skipped = True

    def _dump(self, batch: SaveBatch) -> None:
        assert self.layout is not None
        payload = batch.finish()
        keys: list[bytes] = []
        buffers: list[WritableBuffer] = []
        all_buffers = payload.block_buffers()  # group-major: group g's block i is [g * total + i]
        total = batch.n
        offset = 0
        blocks = 0
        for spec in self._save_specs:
            n = len(spec.block_ids)
            if spec.req_id not in self._failed_reqs:
                for g, (start, count) in enumerate(self._group_keys):
                    keys += [block_key(h, start, count) for h in spec.block_hashes]
                    buffers += all_buffers[g * total + offset : g * total + offset + n]
                blocks += n
            offset += n
        if not keys:
            payload.release()
            return
        task = self.store.dump(keys, buffers, self.layout)
        self._dumps.append(_PendingDump(task, payload, self._save_started, len(keys) * self.layout.nbytes, blocks))

    def _dump_finished_requests(self, specs: Sequence[SaveSpec]) -> None:
        """Hand the finished requests' blocks to the store (see the module docstring)."""
        specs = [s for s in specs if s.req_id not in self._sending]
        req_ids = tuple(s.req_id for s in specs)
        self._sending.update(req_ids)
        specs = [s for s in specs if s.block_ids]
        block_ids = [b for s in specs for b in s.block_ids]
        if not block_ids or not self.can_save or self.paged is None or self.layout is None:
            self._sent.update(req_ids)  # nothing this rank writes (a replica, or nothing to save)
            return
        needed = len(block_ids) * self.paged.block_nbytes(self.heads.local_count)
        try:
            if needed > self.pool.capacity_bytes:
                raise ValueError(f"they need {needed} bytes of host staging, more than the "
                                 f"{self.pool.capacity_bytes} bytes allowed (raise {STAGING_HINT})")
            started = time.perf_counter()
            payload = SaveBatch(self.paged, block_ids, self._groups, self.pool, layerwise=False).finish()
        except (ValueError, PoolExhausted) as exc:
            logger.warning("UCM: not saving %d blocks of finished requests: %s", len(block_ids), exc)
            self._sent.update(req_ids)
            return
        keys: list[bytes] = []
        buffers: list[WritableBuffer] = []
        all_buffers = payload.block_buffers()  # group-major, like `_dump`
        total, offset = len(block_ids), 0
        for spec in specs:
            n = len(spec.block_ids)
            for g, (start, count) in enumerate(self._group_keys):
                keys += [block_key(h, start, count) for h in spec.block_hashes]
                buffers += all_buffers[g * total + offset : g * total + offset + n]
            offset += n
        try:
            task = self.store.dump(keys, buffers, self.layout)
        except StoreError as exc:
            logger.warning("UCM: not saving %d blocks of finished requests: %s", total, exc)
            payload.release()
            self._sent.update(req_ids)
            return
        nbytes = len(keys) * self.layout.nbytes
        self._dumps.append(_PendingDump(task, payload, started, nbytes, total, req_ids))

    def _poll_dumps(self, *, block: bool) -> None:
        still: list[_PendingDump] = []
        for dump in self._dumps:
            if not (block or dump.task.done()):
                still.append(dump)
                continue
            dump.task.wait()  # failures are results (a future miss); the blocks are freed either way
            dump.payload.release()
            self._sent.update(dump.finished_reqs)
            self.stats.add("saved_blocks", dump.blocks)
            self.stats.add("saved_bytes", dump.nbytes)
            self.stats.add("save_seconds", time.perf_counter() - dump.started)
        self._dumps = still

    def poll_finished(self, finished_req_ids: set[str] | None = None) -> tuple[set[str], set[str]]:
        """(finished sending, finished receiving) since the last call: finish saves that are over
        for requests vLLM has named as finished (`finished_req_ids`, now or in an earlier call), and
        async loads that completed (successfully or not)."""
        meta = self._meta
        if meta is not None and not self._finish_handled:
            self._finish_handled = True
            if meta.finish_saves:
                self._dump_finished_requests(meta.finish_saves)
        for req_id, pending in list(self._async.items()):
            if pending.task.done():
                del self._async[req_id]
                self._complete_load(pending, sync=False)
                self._finished_recving.add(req_id)
        self._poll_dumps(block=False)
        # Every step calls this, forward or not, and vLLM steps until our saves are done: the
        # footprint after the last dump of a request is reported.
        self._report_store_gauges()
        self._released |= self._sending & (finished_req_ids or set())
        sending = self._sent & self._released
        self._sending -= sending
        self._sent -= sending
        self._released -= sending
        done, self._finished_recving = self._finished_recving, set()
        return sending, done

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def flush(self) -> None:
        """Wait until every dump handed to the store has completed."""
        self._poll_dumps(block=True)

    def shutdown(self) -> None:
        """Finish every dump in flight so a clean shutdown loses no saved KV (and the sparse
        algorithm's reads, which hold host staging buffers)."""
        if self.sparse is not None:
            self.sparse.close()
        for pending in self._async.values():
            pending.task.wait()
            pending.payload.release()
        self._async.clear()
        self._poll_dumps(block=True)
