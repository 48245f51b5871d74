"""The sparse-attention hook framework: the base class every algorithm implements.

Why hooks: a sparse algorithm needs to see a request at three places that vLLM keeps apart — the
scheduler (which requests exist, how many KV slots each needs, what per-step metadata the workers
get), the worker's step (begin/end of a forward pass, per layer: KV just written, so summaries can
be updated and blocks offloaded) and the attention call itself (the query is only known there, so
block selection happens there). The connector (`ucm.connector`) forwards the scheduler and step
hooks; `ucm.sparse.vllm_patch` forwards the attention hooks from inside vLLM's attention backend.

Every hook has a dense default (do nothing, need every slot), so an algorithm overrides only what
it uses and a half-wired integration degrades to dense attention, never to wrong attention.

Call order, per process role:
  scheduler: bind_kv_cache_manager(manager, stored) once, then
             request_begin(r) -> [estimate_num_slots(r), allocate_slots(r, n), build_sparse_meta(out)]*
             -> request_finished(r)
  worker:    register_kv_caches(caches), register_block_reader(reader) once, then per step:
             execute_begin(meta) -> (decoder_layer_forward(L, ...) { kv_cache_update(L, k, v) -> layer_begin(L)
             -> attention_begin(L, q, ...) | attention_forward(L, ...) -> attention_finished(L, out) }
             -> layer_finished(L, kv))* -> execute_finished()
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is only needed by algorithms; the base stays importable without it
    import torch


class SparseConfigError(ValueError):
    """`ucm_sparse_config` is not valid; the message names the key and what was expected."""


class StoredBlocks(Protocol):
    """The connector's scheduler side, as sparse offload sees it."""

    def stored_block_hashes(self, request_id: str, start: int = 0) -> Sequence[bytes]:
        """Block hashes of the request's leading blocks that the store is known to hold (looked up,
        not merely being written), from block `start` on: KV that can leave the GPU and be read
        back. (From `start`, so a caller asking every step pays for the new blocks only.)"""
        ...

    def stored_chunk_blocks(self, request_id: str, spans: Sequence[tuple[int, int]]) -> list[list[bytes]]:
        """Per span [start, end) of the request's prompt: the hashes of its leading whole blocks,
        hashed as a chain that starts afresh at `start` (cache blend's chunks), that the store
        holds; one batched store lookup for all spans."""
        ...


class PendingBlocks(Protocol):
    """A read of whole stored blocks in flight."""

    def wait(self) -> torch.Tensor:
        """[n, layers, kv heads of this rank, block_size, 2 (K, V), head_dim] on the CPU (the same
        tensor on every call); raises `ucm.store.base.BlocksMissing` naming the blocks the store
        lacks, `StoreError` for any other failure."""
        ...


class BlockReader(Protocol):
    """The connector's worker side, as sparse offload sees it: whole stored blocks, all layers."""

    def start_read(self, block_hashes: Sequence[bytes], ahead: bool = False) -> PendingBlocks:
        """Start reading the blocks (the store's I/O threads do it meanwhile); a read `ahead` of
        need gives up at once rather than wait for buffers. `StoreError` when it cannot start."""
        ...

    def layer_of(self, layer_name: str) -> int:
        """Index of `layer_name` in the read blocks' layer dimension."""
        ...

    def keep_stored(self, block_hashes: Sequence[bytes]) -> int:
        """Mark the blocks' stored objects (this rank's) just used, so the store's LRU eviction
        and `ucm store gc` take others first; returns how many objects are missing. Blocking."""
        ...


class SparseRole(enum.Enum):
    """Which side of vLLM an instance serves; scheduler and worker are separate instances."""

    SCHEDULER = "scheduler"
    WORKER = "worker"

    @classmethod
    def parse(cls, role: object) -> SparseRole:
        """Accept "scheduler"/"worker", a `SparseRole`, or vLLM's `KVConnectorRole` enum (by name)."""
        if isinstance(role, SparseRole):
            return role
        text = role if isinstance(role, str) else getattr(role, "name", None)
        if isinstance(text, str):
            try:
                return cls(text.lower())
            except ValueError:
                pass
        raise SparseConfigError(f"sparse role: expected 'scheduler' or 'worker', got {role!r}")


@dataclasses.dataclass(frozen=True)
class SlotAllocation:
    """The scheduler-side answer for one request: which of its logical KV blocks need a GPU slot now.

    `resident_blocks` are logical block indices (0-based within the request). Dense attention
    keeps all of them; a sparse algorithm keeps a bounded subset.
    """

    request_id: str
    num_blocks: int
    resident_blocks: tuple[int, ...]


class UcmSparseBase:
    """One sparse-attention algorithm instance for one role of one process.

    Subclasses set `name` (the registry key) and receive their validated config object.
    """

    name: str = ""

    @classmethod
    def parse_config(cls, raw: Mapping[str, object]) -> Any:
        """Validate `ucm_sparse_config` (without "name") into the algorithm's config object;
        errors are `SparseConfigError` naming the key."""
        validate_keys("ucm_sparse_config", raw, set())
        return dict(raw)

    def __init__(self, config: Any, role: SparseRole, vllm_config: Any = None) -> None:
        self.config = config
        self.role = role
        self.vllm_config = vllm_config

    # ---------------------------------------------------------------- scheduler side
    def request_begin(self, request: Any) -> None:
        """First time the connector sees `request` (vLLM `Request`: request_id, prompt_token_ids...)."""

    def request_finished(self, request: Any) -> None:
        """The request is done; drop its state (selection, summaries, resident blocks)."""

    def estimate_num_slots(self, request: Any, num_tokens: int) -> int:
        """KV token slots `request` needs on the GPU to hold `num_tokens` tokens; dense: all of them."""
        return num_tokens

    def allocate_slots(self, request_id: str, num_blocks: int) -> SlotAllocation:
        """Which logical blocks of a request with `num_blocks` blocks get a GPU slot; dense: all."""
        return SlotAllocation(request_id, num_blocks, tuple(range(num_blocks)))

    def build_sparse_meta(self, scheduler_output: Any) -> object | None:
        """Per-step metadata shipped to the workers (attached as `sparse_meta`); None = nothing."""
        return None

    def bind_kv_cache_manager(self, kv_cache_manager: Any, stored: StoredBlocks) -> None:
        """vLLM's `KVCacheManager` of this scheduler and what the connector knows the store holds
        (an algorithm that frees GPU blocks of stored KV needs both)."""

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        """vLLM's paged KV cache tensors, by layer name (called once before the first step)."""

    def register_block_reader(self, reader: BlockReader) -> None:
        """The connector's reader of whole stored blocks (an algorithm that fetches offloaded KV)."""

    def execute_begin(self, sparse_meta: object | None) -> None:
        """A forward pass starts; `sparse_meta` is what `build_sparse_meta` produced for it."""

    def execute_finished(self) -> None:
        """The forward pass is done (all layers saved)."""

    def layer_begin(self, layer_name: str) -> None:
        """Before `layer_name`'s attention: wait for any block fetch this layer needs."""

    def layer_finished(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        """After `layer_name` wrote its new KV into `kv_layer`: update summaries, offload."""

    def attention_begin(self, layer_name: str, query: torch.Tensor, paged_kv: Any, attn_metadata: Any) -> Any:
        """Just before attention, with the step's queries and the layer's paged KV
        (`ucm.sparse.paged.LayerKV`); may select blocks and return a modified `attn_metadata`
        (the default returns it unchanged: dense attention)."""
        return attn_metadata

    def attention_finished(self, layer_name: str, output: torch.Tensor) -> None:
        """Just after attention; undo anything attention_begin changed for this layer."""

    @property
    def replaces_attention(self) -> bool:
        """Whether the algorithm computes attention itself (`attention_forward`) instead of
        steering the backend's kernel through `attention_begin` (window extrapolation does)."""
        return False

    def attention_forward(
        self, layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor, layout: str, attn_metadata: Any,
        scale: float, output: torch.Tensor, run_kernel: Callable[[], object],
    ) -> None:
        """Compute the layer's attention into `output` ([tokens, heads * head]); `query` is
        [tokens, heads, head] as the model rotated it, `kv_cache` the layer's paged cache in
        `layout` ("cpu_vec" or "bhnc", `ucm.transfer.paged.KVLayout`) with this step's K/V written.
        `run_kernel()` runs the backend's own kernel into `output` — the default, and what an
        algorithm calls for the rows it leaves alone (before writing its own rows)."""
        run_kernel()

    @property
    def reshapes_batch(self) -> bool:
        """Whether the algorithm runs some decoder layers on a subset of the step's tokens
        (`decoder_layer_forward`) and so also writes the KV cache itself (`kv_cache_update`):
        cache blend does. Others leave both hooks alone and pay nothing for them."""
        return False

    def kv_cache_update(
        self, layer_name: str, key: torch.Tensor, value: torch.Tensor, layout: str, slot_mapping: torch.Tensor,
        write: Callable[[torch.Tensor, torch.Tensor], None],
    ) -> None:
        """Write the step's K/V ([tokens, kv_heads, head], rotated) into `layer_name`'s paged cache
        (in `layout`, as for `attention_forward`); `write(key, value)` is the backend's own writer,
        for K/V of every token of the step in order (`slot_mapping` [tokens] is where each goes).
        An algorithm may write other K/V than the model computed (loaded ones), and must hand
        `write` all tokens even when the layer ran on a subset."""
        write(key, value)

    def decoder_layer_forward(
        self, layer_name: str, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
        run_layer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one decoder layer (`layer_name` is its attention layer's name); `run_layer(positions,
        hidden_states, residual)` is the model's own. An algorithm may run it on a subset of the
        tokens, as long as the last layer hands back every token of the step."""
        return run_layer(positions, hidden_states, residual)

    def take_counters(self) -> dict[str, int]:
        """Counters since the last call, by the connector's stat names (`ucm.connector.stats`:
        logged by vLLM and exported as vllm:ucm_<name>); empty when there is nothing to report."""
        return {}

    @property
    def offloads_to_store(self) -> bool:
        """Whether the algorithm frees GPU blocks the store holds: the connector then saves every
        block as it fills, generated tokens' blocks included, in every role."""
        return False

    @property
    def offloading(self) -> bool:
        """Whether some request's KV has left the GPU, so attention must not fall back to dense."""
        return False

    def close(self) -> None:
        """Release threads, buffers and store handles."""


def validate_keys(section: str, given: Mapping[str, object], accepted: set[str]) -> None:
    """Reject unknown keys by name, so a typo never silently runs with defaults."""
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise SparseConfigError(
            f"{section}.{unknown[0]}: unknown key; accepted keys: {', '.join(sorted(accepted))}"
        )
