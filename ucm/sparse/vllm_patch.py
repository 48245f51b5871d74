"""The attention hooks inside vLLM 0.32's forward pass: a wrapper around the backend's `forward`.

Why the backend impl and not `Attention.forward`: with torch.compile / CUDA graphs, the model's
`Attention.forward` is traced away, but every path (eager or compiled, through the
`unified_attention_with_output` custom op) still ends in `layer.impl.forward(layer, query, key,
value, kv_cache, attn_metadata, output, ...)`, looked up on the impl class at call time. Wrapping
that method there sees the query, the layer's paged KV cache and the per-layer metadata.

What the wrapper does: if a worker-side sparse algorithm is active (`get_active_sparse`), it calls
`attention_begin(layer_name, query, LayerKV, attn_metadata)`, runs the original kernel with the
metadata it returns (block retrieval: decode rows compacted to the selected blocks), then
`attention_finished(layer_name, output)`. With no active algorithm it calls the original directly.

It patches private vLLM internals, so it is pinned: any vLLM other than 0.32.0 is refused with an
error naming the found version. Selection is Python per decode row, so it cannot live inside a
captured CUDA graph: during capture the wrapper stays dense, so full-graph decode replays run dense
attention. Run sparse workers with `--enforce-eager` (or a cudagraph mode that keeps attention out
of the graph, e.g. `-O '{"cudagraph_mode": "PIECEWISE"}'`) for the selection to take effect.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from ucm.sparse.active import get_active_sparse
from ucm.sparse.base import SparseRole
from ucm.sparse.offload import OffloadError
from ucm.sparse.paged import LayerKV
from ucm.transfer.paged import KVLayout

SUPPORTED_VLLM = "0.32.0"
logger = logging.getLogger(__name__)

# backend impl classes wrapped, with the cache layout their forward receives (`ucm.transfer.paged.KVLayout`
# values: the CPU backend stores K transposed per block, the GPU backends K|V per token)
PATCH_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl", "bhnc"),
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl", "bhnc"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "cpu_vec"),
)
# decoder layer classes whose forward(positions, hidden_states, residual) -> (hidden_states, residual)
# is wrapped for algorithms that run later layers on a subset of the tokens (cache blend); a model
# whose layers are not listed is refused by those algorithms, never run half-hooked
DECODER_LAYER_TARGETS: tuple[tuple[str, str], ...] = (
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),  # Llama, Mistral, SmolLM2
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
)
_MARK = "__ucm_sparse_original__"
# the CPU backend's ISAs whose blocks are `KVLayout.CPU_VEC` (K transposed, then V); block retrieval
# runs only on those
CPU_VEC_ISAS = ("vec", "vec16")


class VllmVersionError(RuntimeError):
    """The installed vLLM is not the version the patch was written against."""


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or `VllmVersionError` unless it is exactly 0.32.0."""
    if version is None:
        import vllm  # function-level: vLLM is heavy and optional; only this check, given no version, needs it

        version = str(vllm.__version__)
    if version != SUPPORTED_VLLM:
        raise VllmVersionError(
            f"ucm sparse attention patches vLLM {SUPPORTED_VLLM} attention internals, but vLLM {version} is "
            f"installed; install vllm=={SUPPORTED_VLLM} or remove ucm_sparse_config from the connector config"
        )
    return version


def make_attention_wrapper(original: Callable[..., Any], layout: str = "bhnc") -> Callable[..., Any]:
    """`original` (an impl's forward, whose cache is in `layout`) with the attention hooks around it."""
    @functools.wraps(original)
    def forward(
        self: Any,
        layer: Any,
        query: Any,
        key: Any,
        value: Any,
        kv_cache: Any,
        attn_metadata: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        sparse = get_active_sparse(SparseRole.WORKER)
        if (
            sparse is None
            or attn_metadata is None
            or kv_cache is None
            or kv_cache.numel() == 0
            # a captured CUDA graph would freeze this step's compacted block table into every
            # replay; inside capture stay dense (replays of full graphs then run dense attention)
            or (kv_cache.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            return original(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        if sparse.replaces_attention:  # window extrapolation: the algorithm computes attention itself
            output = kwargs["output"] if "output" in kwargs else args[0]
            sparse.attention_forward(
                str(getattr(layer, "layer_name", "")), query, kv_cache, layout, attn_metadata, float(self.scale),
                output[: attn_metadata.num_actual_tokens],
                lambda: original(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs),
            )
            return output
        if layout == "cpu_vec" and getattr(layer, "isa", None) not in CPU_VEC_ISAS:
            # AMX and the other ISAs pack blocks differently: scoring would read the wrong bytes
            if sparse.offloading:
                raise OffloadError(
                    f"ucm sparse offload on vLLM's CPU backend needs its {'/'.join(CPU_VEC_ISAS)} kernels, but "
                    f"layer {getattr(layer, 'layer_name', '?')} runs ISA {getattr(layer, 'isa', '?')!r}; "
                    "serve in float32 or turn offload off"
                )
            return original(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        if uses_token_distances(self):
            if sparse.offloading:  # dense attention here would read blocks that left the GPU
                raise OffloadError(
                    f"ucm sparse offload needs block-sparse attention in every layer, but layer "
                    f"{getattr(layer, 'layer_name', '?')} uses ALiBi or a sliding window; turn offload off"
                )
            return original(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        layer_name = str(getattr(layer, "layer_name", ""))
        paged = LayerKV.from_layer_cache(kv_cache, KVLayout(layout), int(self.head_size))
        metadata = sparse.attention_begin(layer_name, query, paged, attn_metadata)
        if layout == "cpu_vec" and metadata is not attn_metadata:
            metadata = _cpu_schedule(self, layer, query, metadata)
        result = original(self, layer, query, key, value, kv_cache, metadata, *args, **kwargs)
        output = kwargs.get("output", args[0] if args else result)
        sparse.attention_finished(layer_name, output)
        return result

    setattr(forward, _MARK, original)
    return forward


def make_kv_update_wrapper(original: Callable[..., Any], layout: str = "bhnc") -> Callable[..., Any]:
    """`original` (an impl's `do_kv_cache_update`) through the algorithm's `kv_cache_update` hook."""
    @functools.wraps(original)
    def do_kv_cache_update(self: Any, layer: Any, key: Any, value: Any, kv_cache: Any, slot_mapping: Any) -> Any:
        sparse = get_active_sparse(SparseRole.WORKER)
        if sparse is None or not sparse.reshapes_batch:
            return original(self, layer, key, value, kv_cache, slot_mapping)
        sparse.kv_cache_update(
            str(getattr(layer, "layer_name", "")), key, value, layout, slot_mapping,
            lambda k, v: original(self, layer, k, v, kv_cache, slot_mapping),
        )
        return None

    setattr(do_kv_cache_update, _MARK, original)
    return do_kv_cache_update


def make_decoder_layer_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` (a decoder layer's `forward`) through the algorithm's `decoder_layer_forward` hook."""
    @functools.wraps(original)
    def forward(self: Any, positions: Any, hidden_states: Any, residual: Any, *args: Any, **kwargs: Any) -> Any:
        sparse = get_active_sparse(SparseRole.WORKER)
        if sparse is None or not sparse.reshapes_batch:
            return original(self, positions, hidden_states, residual, *args, **kwargs)
        return sparse.decoder_layer_forward(
            str(self.self_attn.attn.layer_name), positions, hidden_states, residual,
            lambda p, h, r: original(self, p, h, r, *args, **kwargs),
        )

    setattr(forward, _MARK, original)
    return forward


def decoder_layer_classes() -> list[Any]:
    """The importable classes of `DECODER_LAYER_TARGETS` (those an algorithm's model may use)."""
    found: list[Any] = []  # Any: the model classes are assigned a wrapped `forward`
    for module_name, class_name in DECODER_LAYER_TARGETS:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return found


def _cpu_schedule(impl: Any, layer: Any, query: torch.Tensor, metadata: Any) -> Any:
    """`metadata` with the CPU kernel's work partition recomputed for its (compacted) `seq_lens`:
    the builder's partition splits the dense lengths, and the kernel follows it blindly. The
    arguments are the builder's (`CPUAttentionMetadataBuilder.build`), taken from the layer."""
    from vllm import (
        _custom_ops as ops,  # function-level: only a CPU-backend step with compacted rows needs it
    )
    from vllm import envs

    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=int(metadata.seq_lens.shape[0]),
        num_heads=int(impl.num_heads),
        num_kv_heads=int(impl.num_kv_heads),
        head_dim=int(impl.head_size),
        seq_lens=metadata.seq_lens,
        dtype=query.dtype,
        query_start_loc=metadata.query_start_loc,
        causal=metadata.causal,
        sliding_window_size=-1,  # a windowed layer never gets here (`uses_token_distances`)
        isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=metadata.dynamic_causal,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    return dataclasses.replace(metadata, scheduler_metadata=schedule)


def uses_token_distances(impl: Any) -> bool:
    """ALiBi and sliding windows depend on key positions, which compaction changes: stay dense."""
    window = getattr(impl, "sliding_window", None)
    # the GPU impls hold a (left, right) pair, the CPU impl one int; -1 means none in both
    has_window = window is not None and tuple(window if isinstance(window, (tuple, list)) else (window,)) not in ((-1, -1), (-1,))
    return getattr(impl, "alibi_slopes", None) is not None or has_window


def is_patched(cls: type) -> bool:
    return hasattr(cls.__dict__.get("forward"), _MARK)


def install_attention_hooks(version: str | None = None) -> list[type]:
    """Wrap the `forward` of every importable backend impl in `PATCH_TARGETS` (idempotent);
    returns the classes patched. Raises `VllmVersionError` on any vLLM but 0.32.0."""
    check_vllm_version(version)
    patched: list[type] = []
    for module_name, class_name, layout in PATCH_TARGETS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # a backend this build of vLLM lacks; the others are still hooked
        if not is_patched(cls):
            cls.forward = make_attention_wrapper(cls.forward, layout)
        update = cls.__dict__.get("do_kv_cache_update")
        if update is not None and not hasattr(update, _MARK):
            cls.do_kv_cache_update = make_kv_update_wrapper(update, layout)
        patched.append(cls)
    for layer_cls in decoder_layer_classes():
        if not is_patched(layer_cls):
            layer_cls.forward = make_decoder_layer_wrapper(layer_cls.__dict__["forward"])
    if not patched:
        raise VllmVersionError(f"vLLM {SUPPORTED_VLLM}: none of {PATCH_TARGETS} could be imported")
    return patched


def uninstall_attention_hooks() -> None:
    """Restore the original `forward` methods (tests; a process that turns sparse attention off)."""
    for module_name, class_name, _layout in PATCH_TARGETS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if is_patched(cls):
            cls.forward = getattr(cls.__dict__["forward"], _MARK)
        update = cls.__dict__.get("do_kv_cache_update")
        if update is not None and hasattr(update, _MARK):
            cls.do_kv_cache_update = getattr(update, _MARK)
    for layer_cls in decoder_layer_classes():
        if is_patched(layer_cls):
            layer_cls.forward = getattr(layer_cls.__dict__["forward"], _MARK)


def install_admission_gate(kv_cache_manager: Any, blocks_needed: Callable[[Any, int], int]) -> None:
    """Make `kv_cache_manager`'s full-prompt admission gate count `blocks_needed(request, chunk
    tokens)` free blocks instead of the whole prompt's (sparse offload: a long prompt holds its
    windows, a chunk and its slots, so one longer than the pool is admitted and completes).

    vLLM 0.32's scheduler admits a waiting request through `allocate_slots(...,
    full_sequence_must_fit=scheduler_reserve_full_isl)`, which refuses it unless every block of
    its prompt is free; with the gate, the same call allocates the chunk once `blocks_needed` are
    free. Only this manager instance is wrapped (the scheduler's own)."""
    original = kv_cache_manager.allocate_slots
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def allocate_slots(request: Any, num_new_tokens: int, *args: Any, full_sequence_must_fit: bool = False,
                       **kwargs: Any) -> Any:
        if full_sequence_must_fit:
            if blocks_needed(request, num_new_tokens) > kv_cache_manager.block_pool.get_num_free_blocks():
                return None
            full_sequence_must_fit = False
        return original(request, num_new_tokens, *args, full_sequence_must_fit=full_sequence_must_fit, **kwargs)

    setattr(allocate_slots, _MARK, original)
    kv_cache_manager.allocate_slots = allocate_slots


def offload_kv_memory(vllm_config: Any, groups: Any, max_model_len: int) -> int | None:
    """KV bytes one request of `max_model_len` tokens needs when the connector's sparse offload is
    configured (`offload_bound_blocks` blocks), or None when it is not."""
    from vllm.v1.core import kv_cache_utils  # function-level: only the engine's start-up check needs it

    from ucm.sparse.block_retrieval import BlockRetrievalConfig
    from ucm.sparse.vllm_offload import offload_bound_blocks

    transfer = getattr(vllm_config, "kv_transfer_config", None)
    sparse = (getattr(transfer, "kv_connector_extra_config", None) or {}).get("ucm_sparse_config")
    if not isinstance(sparse, dict) or sparse.get("name") != "block_retrieval" or sparse.get("offload") is not True:
        return None
    config = BlockRetrievalConfig.from_dict({k: v for k, v in sparse.items() if k != "name"})
    block_size = int(vllm_config.cache_config.block_size)
    chunk = int(vllm_config.scheduler_config.max_num_batched_tokens)
    blocks = offload_bound_blocks(config, block_size, max_model_len, chunk)
    return blocks * int(kv_cache_utils._pool_bytes_per_block(vllm_config, groups))


def install_memory_check() -> None:
    """Make vLLM's start-up check (`max_model_len` must fit the KV cache) count what one request
    holds under sparse offload: without it, a pool smaller than `max_model_len` refuses to start
    even though offload serves such a request. Installed by the plugin in every vLLM process
    (the check runs in the engine core before any connector exists); with no offload configured it
    is vLLM's own check. The engine's call passes `get_needed_memory` as a partial over
    (vllm_config, groups): that is where the config is read."""
    from vllm.v1.core import kv_cache_utils  # function-level: vLLM is optional for ucm

    original = kv_cache_utils._check_enough_kv_cache_memory
    if hasattr(original, _MARK):
        return

    @functools.wraps(original)
    def check(available_memory: int, get_needed_memory: Callable[[], int], max_model_len: int,
              estimate_max_model_len: Callable[[int], int]) -> None:
        args: tuple[Any, ...] = getattr(get_needed_memory, "args", ())
        needed = offload_kv_memory(args[0], args[1], max_model_len) if len(args) >= 2 else None
        if needed is None or available_memory <= 0:
            return original(available_memory, get_needed_memory, max_model_len, estimate_max_model_len)  # type: ignore[no-any-return]
        if needed > available_memory:
            raise ValueError(
                f"ucm sparse offload: one request of max_model_len {max_model_len} holds up to {needed} bytes of KV "
                f"blocks (windows, a prefill chunk and a selection's slots), more than the {available_memory} bytes "
                "of KV cache; lower max_model_len or max_num_batched_tokens, or give the KV cache more memory"
            )
        logger.info(
            "UCM sparse offload: max_model_len %d needs %d bytes of KV cache under offload (%d without); %d available",
            max_model_len, needed, get_needed_memory(), available_memory,
        )
        return None

    setattr(check, _MARK, original)
    kv_cache_utils._check_enough_kv_cache_memory = check
