"""Scheduler side of the UCM connector: external prefix hits, load and save plans, PD hand-off.

Per request the scheduler keeps the chained block hashes of its tokens (`ucm.hashing`), how far
its blocks are known to be in the store, and a pending load plan between
`get_num_new_matched_tokens` and `update_state_after_alloc`. Each step `build_meta` turns plans into
`LoadSpec`s and, for producers, `SaveSpec`s for the prompt blocks that become full in that step
(chunked prefill saves chunk by chunk; a resumed request reloads what was saved before it was
preempted). With sparse offload (`save_generated`) generated tokens' blocks are saved as they fill
too, in every role: only blocks the store holds may leave the GPU.

Multi-turn reuse: a chat's next turn sends the previous answer back as prompt, so when a request
finishes, the full blocks holding its generated tokens are saved too (`request_finished` returns
delay_free_blocks=True and a finish save goes to the workers with the next step's metadata; vLLM
frees the blocks once every worker has reported the request in get_finished's finished-sending
set). Only blocks whose KV is already computed and processed are saved: the last sampled token has
no KV yet, and with async scheduling a step still in flight may be writing the positions after
`num_computed_tokens - num_in_flight_tokens`.

Hits are full blocks only and never the whole prompt: vLLM must compute at least the last prompt
token to sample the next one. A consumer handed `kv_transfer_params` from a producer
(`do_remote_prefill`) waits, bounded by `remote_wait_s`, for the producer's dump to become
visible, so the decode side does not recompute just because it raced the write.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import xxhash

from ucm.connector.metadata import LoadSpec, SaveSpec, UCMConnectorMetadata
from ucm.connector.stats import UCMConnectorStats
from ucm.hashing import BlockHasher, CacheIdentity, block_key
from ucm.store.base import Store

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# kv_transfer_params keys this connector reads and writes (besides vLLM's do_remote_*).
PARAM_IDENTITY = "ucm_identity"  # hex digest of the producer's CacheIdentity
PARAM_TOKENS = "ucm_num_tokens"  # prompt tokens whose full blocks the producer saved


def _cacheable(request: Request) -> bool:
    """Token ids alone identify the KV: not for multimodal inputs (placeholder tokens are equal for
    different images) or prompt embeddings, which UCM therefore neither loads nor saves."""
    return not request.mm_features and getattr(request, "prompt_embeds", None) is None


def _root_parent(request: Request) -> bytes | None:
    """Start of the hash chain: a request's cache salt and LoRA adapter change its KV, so they
    seed the chain (requests with different salts or adapters never share blocks)."""
    salt = request.cache_salt or ""
    lora = request.lora_request.lora_name if request.lora_request is not None else ""
    if not salt and not lora:
        return None
    return xxhash.xxh3_128_digest(f"ucm-request-root\0{salt}\0{lora}".encode())


@dataclasses.dataclass
class _RequestState:
    request: Request
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    hashed_tokens: int = 0
    saved_blocks: int = 0  # blocks [0, saved_blocks) are in the store or being saved
    confirmed_blocks: int = 0  # blocks [0, confirmed_blocks) a lookup found in the store
    pending: tuple[int, int] | None = None  # (first block, number of blocks) to load
    loading_async: bool = False  # an async load is in flight: vLLM itself holds the blocks until it ends
    first_lookup: float = dataclasses.field(default_factory=time.monotonic)
    lookup_counted: bool = False


class UCMSchedulerSide:
    """The scheduler-role logic (no torch, no worker state)."""

    def __init__(
        self,
        *,
        identity: CacheIdentity,
        store: Store,
        head_groups: Sequence[tuple[int, int]],
        can_save: bool,
        produces_for_remote: bool,
        load_async: bool,
        save_generated: bool = False,
        remote_wait_s: float = 10.0,
        sparse: Any = None,
    ) -> None:
        self.identity = identity
        self.block_size = identity.block_size
        self.hasher = BlockHasher(identity)
        self.store = store
        self.head_groups = list(head_groups)
        self.can_save = can_save
        self.produces_for_remote = produces_for_remote
        self.save_generated = save_generated  # also save generated tokens' blocks as they fill (offload)
        self.load_async = load_async
        self.remote_wait_s = remote_wait_s
        self.sparse = sparse
        self.kv_cache_manager: KVCacheManager | None = None
        self.stats = UCMConnectorStats()
        self._states: dict[str, _RequestState] = {}
        self._loads: list[LoadSpec] = []
        self._finish_saves: list[SaveSpec] = []

    # ---- helpers -------------------------------------------------------------------------------

    def _state(self, request: Request) -> _RequestState:
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = _RequestState(request)
            if self.sparse is not None:
                self.sparse.request_begin(request)
        state.request = request
        return state

    def _hashes(self, state: _RequestState, num_tokens: int) -> list[bytes]:
        """Hashes of the full blocks of the first `num_tokens` tokens (extended incrementally)."""
        full = num_tokens - num_tokens % self.block_size
        if full > state.hashed_tokens:
            tokens = list(state.request.all_token_ids[state.hashed_tokens : full])
            parent = state.hashes[-1] if state.hashes else _root_parent(state.request)
            state.hashes.extend(self.hasher.hash_blocks(tokens, parent))
            state.hashed_tokens = full
        return state.hashes[: full // self.block_size]

    def keys_of(self, block_hash: bytes) -> list[bytes]:
        return [block_key(block_hash, start, count) for start, count in self.head_groups]

    def _present_prefix(self, hashes: Sequence[bytes]) -> int:
        """Leading blocks whose every head group is in the store."""
        if not hashes:
            return 0
        per_block = len(self.head_groups)
        found = self.store.lookup([k for h in hashes for k in self.keys_of(h)])
        for i in range(len(hashes)):
            if not all(found[i * per_block : (i + 1) * per_block]):
                return i
        return len(hashes)

    # ---- vLLM scheduler hooks ------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._state(request)
        if not _cacheable(request):
            return 0, False
        # At least one token is always computed by vLLM, so the last block may never fully hit.
        max_blocks = (request.num_tokens - 1) // self.block_size
        first = num_computed_tokens // self.block_size
        if first >= max_blocks:
            return 0, False
        hashes = self._hashes(state, max_blocks * self.block_size)
        hits = self._present_prefix(hashes[first:max_blocks])
        if not state.lookup_counted:
            state.lookup_counted = True
            self.stats.add("lookup_tokens", max_blocks * self.block_size)
        expected = self._remote_expected_blocks(request)
        if expected is not None and first + hits < min(expected, max_blocks):
            waited = time.monotonic() - state.first_lookup
            if waited < self.remote_wait_s:
                return None, False  # the producer's dump is not visible yet: ask again next step
            logger.warning(
                "UCM: request %s: producer saved %d blocks but only %d are in the store after %.1fs; "
                "recomputing the rest", request.request_id, expected, first + hits, waited,
            )
        state.pending = (first, hits) if hits else None
        tokens = hits * self.block_size
        return tokens, bool(tokens) and self.load_async

    def _remote_expected_blocks(self, request: Request) -> int | None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return None
        identity = params.get(PARAM_IDENTITY)
        if identity is not None and identity != self.identity.digest().hex():
            logger.warning(
                "UCM: request %s: kv_transfer_params come from a producer with another cache identity "
                "(%s, ours %s: %s); its blocks cannot be used", request.request_id, identity,
                self.identity.digest().hex(), self.identity.describe(),
            )
            return None
        tokens = params.get(PARAM_TOKENS)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
            return None
        return tokens // self.block_size

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        state = self._state(request)
        pending, state.pending = state.pending, None
        if num_external_tokens == 0 or pending is None:
            return
        first, hits = pending
        count = min(hits, num_external_tokens // self.block_size)
        block_ids = blocks.get_block_ids()[0][first : first + count]
        self._loads.append(
            LoadSpec(
                req_id=request.request_id,
                block_ids=list(block_ids),
                block_hashes=state.hashes[first : first + count],
                is_async=self.load_async,
            )
        )
        state.saved_blocks = max(state.saved_blocks, first + count)
        state.loading_async = self.load_async and count > 0
        self.stats.add("hit_tokens", count * self.block_size)

    def loads_finished(self, req_ids: set[str] | None) -> None:
        """Async loads the workers reported as finished receiving."""
        for req_id in req_ids or ():
            state = self._states.get(req_id)
            if state is not None:
                state.loading_async = False

    def build_meta(self, scheduler_output: SchedulerOutput) -> UCMConnectorMetadata:
        meta = UCMConnectorMetadata(loads=self._loads, finish_saves=self._finish_saves)
        self._loads = []
        self._finish_saves = []
        if self.can_save:
            cached = scheduler_output.scheduled_cached_reqs
            progress = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
            progress += list(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
            for req_id, num_computed in progress:
                save = self._save_spec(req_id, num_computed, scheduler_output.num_scheduled_tokens[req_id])
                if save is not None:
                    meta.saves.append(save)
        if self.sparse is not None:
            meta.sparse_meta = self.sparse.build_sparse_meta(scheduler_output)
        return meta

    def _save_spec(self, req_id: str, num_computed: int, num_scheduled: int) -> SaveSpec | None:
        state = self._states.get(req_id)
        if state is None or self.kv_cache_manager is None or not _cacheable(state.request):
            return None
        request = state.request
        # tokens this step computes, as far as their ids are known (async scheduling may still be
        # sampling the last ones)
        known = request.num_tokens if self.save_generated else request.num_prompt_tokens
        end = min(num_computed + num_scheduled, known)
        full_end = end // self.block_size
        first = max(state.saved_blocks, num_computed // self.block_size)
        if full_end <= first:
            return None
        hashes = self._hashes(state, full_end * self.block_size)
        block_ids = self.kv_cache_manager.get_block_ids(req_id)[0]
        state.saved_blocks = full_end
        return SaveSpec(req_id=req_id, block_ids=list(block_ids[first:full_end]), block_hashes=hashes[first:full_end])

    def stored_block_hashes(self, request_id: str, start: int = 0) -> list[bytes]:
        """Hashes of the request's leading blocks that a store lookup found, from block `start` on
        (sparse offload frees only those GPU blocks): blocks being saved are looked up again at
        later steps."""
        state = self._states.get(request_id)
        if state is None:
            return []
        state.confirmed_blocks = min(state.confirmed_blocks, state.saved_blocks)
        if state.confirmed_blocks < state.saved_blocks:
            pending = state.hashes[state.confirmed_blocks : state.saved_blocks]
            state.confirmed_blocks += self._present_prefix(pending)
        return state.hashes[start : state.confirmed_blocks]

    def stored_chunk_blocks(self, request_id: str, spans: Sequence[tuple[int, int]]) -> list[list[bytes]]:
        """Cache blend's chunk lookup (`ucm.sparse.base.StoredBlocks`): a chunk's chain starts at
        its own first token, from the request's root (salt, adapter), so it equals the prefix chain
        of any request that began with the chunk - which is how chunks get stored."""
        state = self._states.get(request_id)
        if state is None or not spans:
            return [[] for _ in spans]
        tokens = state.request.prompt_token_ids or []
        root = _root_parent(state.request)
        chains = [self.hasher.hash_blocks(tokens[start:end], root) for start, end in spans]
        per_block = len(self.head_groups)
        found = self.store.lookup([k for chain in chains for h in chain for k in self.keys_of(h)])
        result: list[list[bytes]] = []
        offset = 0
        for chain in chains:
            present = 0
            while present < len(chain) and all(found[offset + present * per_block : offset + (present + 1) * per_block]):
                present += 1
            result.append(chain[:present])
            offset += len(chain) * per_block
        return result

    def blocks_failed(self, invalid_block_ids: set[int]) -> None:
        """Loads of these blocks failed (vLLM recomputes them): save them again once recomputed, so
        the store heals instead of missing them for every later request."""
        if not invalid_block_ids or self.kv_cache_manager is None:
            return
        for req_id, state in self._states.items():
            block_ids = self.kv_cache_manager.get_block_ids(req_id)[0]
            for idx, block_id in enumerate(block_ids[: state.saved_blocks]):
                if block_id in invalid_block_ids:
                    state.saved_blocks = idx
                    break

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's request_finished: (delay freeing the blocks until the finish save is reported,
        kv_transfer_params for a decode instance). `block_ids` are the blocks of the request's
        computed tokens (empty for a preempted or never-scheduled request)."""
        state = self._states.pop(request.request_id, None)
        if self.sparse is not None:
            self.sparse.request_finished(request)
        saved = state.saved_blocks if state is not None else 0  # prompt blocks saved while it ran
        delay = state is not None and self._plan_finish_save(state, block_ids)
        params = request.kv_transfer_params or {}
        if not self.can_save or not (self.produces_for_remote or params.get("do_remote_decode")):
            return delay, None
        return delay, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            PARAM_IDENTITY: self.identity.digest().hex(),
            PARAM_TOKENS: saved * self.block_size,
        }

    def _plan_finish_save(self, state: _RequestState, block_ids: Sequence[int]) -> bool:
        """Queue a save of the finished request's full blocks not saved yet (its generated tokens);
        True when there is one, i.e. vLLM must keep the blocks until the workers report it."""
        request = state.request
        if not self.can_save or not _cacheable(request) or state.loading_async:
            # While an async load is in flight vLLM delays the free itself and frees the blocks on
            # finished_recving; a second owner would free them twice.
            return False
        processed = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
        end = min(processed, request.num_tokens - 1, len(block_ids) * self.block_size) // self.block_size
        first = state.saved_blocks
        if end <= first:
            return False
        hashes = self._hashes(state, end * self.block_size)
        state.saved_blocks = end
        self._finish_saves.append(
            SaveSpec(req_id=request.request_id, block_ids=list(block_ids[first:end]), block_hashes=hashes[first:end])
        )
        return True

    def take_stats(self) -> UCMConnectorStats | None:
        return self.stats.take()
