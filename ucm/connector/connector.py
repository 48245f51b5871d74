"""`UCMConnector`: the vLLM 0.32 `KVConnectorBase_V1` that puts KV blocks in a shared UCM store.

vLLM creates one instance per role: in the scheduler process (`UCMSchedulerSide`: prefix lookups,
load/save plans, PD `kv_transfer_params`) and in each worker (`UCMWorkerSide`: store I/O and the
GPU/host transfer path for the heads that rank owns). This class only adapts vLLM's interface to
those two and builds what both need from vLLM's configuration: the cache identity that names
blocks, the store, the TP head plan and the cache layout.

Roles: every role loads the prefix hits it finds in the shared store; `kv_producer` and `kv_both`
save what they compute; `kv_producer` also hands a decode instance `kv_transfer_params`, and
`kv_consumer` (a PD decode pod) only loads. A PD prefill pod therefore recomputes only what nobody
stored: turn 2 of a chat loads turn 1's prompt whichever pod computed it. A failed load is a
cache miss, never a failed request, so the connector runs vLLM with
`kv_load_failure_policy="recompute"` (it says so in the log when it overrides the setting).
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from ucm.blend.config import BlendConfig
from ucm.connector.config import UCMConfig, parse_extra_config
from ucm.connector.heads import canonical_group_size, plan_heads
from ucm.connector.metadata import UCMConnectorMetadata
from ucm.connector.scheduler import UCMSchedulerSide
from ucm.connector.stats import UCMConnectorStats, UCMPromMetrics
from ucm.connector.worker import CacheSpec, UCMWorkerSide
from ucm.hashing import CacheIdentity, KVGeometry
from ucm.store import Store, StoreOptions, open_store
from ucm.transfer.buffers import HostBufferPool
from ucm.window.config import WindowConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# Host staging (pinned on CUDA) is allocated on demand up to this many bytes per worker.
DEFAULT_STAGING_BYTES = 8 << 30
STAGING_ENV = "UCM_HOST_STAGING_BYTES"
# How long a step may wait for staging held by dumps still in flight before it skips its save.
STAGING_WAIT_S = 1.0


def build_identity(vllm_config: VllmConfig, config: UCMConfig) -> CacheIdentity:
    """Everything that changes the KV bytes, from vLLM's configuration plus the model identity."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    dtype = cache.cache_dtype if cache.cache_dtype != "auto" else str(model.dtype).removeprefix("torch.")
    is_mla = bool(model.use_mla)
    geometry = KVGeometry(
        num_layers=model.get_total_num_hidden_layers(),
        num_kv_heads=1 if is_mla else model.get_total_num_kv_heads(),
        head_size=model.get_head_size(),
        is_mla=is_mla,
    )
    return CacheIdentity(
        model=config.model_id,
        revision=config.model_revision,
        dtype=str(dtype),
        geometry=geometry,
        block_size=cache.block_size,
        cache_salt=config.cache_salt,
        attention=attention_identity(model.hf_config, config),
    )


def attention_identity(hf_config: Any, config: UCMConfig) -> str:
    """The part of the cache identity that says how K/V were computed when it is not plain RoPE
    attention: ReRoPE's parameters (layers above the first differ past the window) and the model's
    rope scaling (YaRN, NTK, ... change K itself). "" for plain attention, so its digests stay put."""
    parts = []
    if config.ucm_window_config is not None:
        parts.append(WindowConfig.parse(config.ucm_window_config).identity())
    if config.ucm_blend_config is not None:  # blended (approximate) KV is saved back under prefix keys
        parts.append(BlendConfig.parse(config.ucm_blend_config).identity())
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if isinstance(rope, dict) and str(rope.get("rope_type", rope.get("type", "default"))) != "default":
        parts.append("rope:" + json.dumps(rope, sort_keys=True, default=str))
    return ";".join(parts)


def open_configured_store(config: UCMConfig, identity: CacheIdentity) -> Store:
    return open_store(config.store_path, StoreOptions(
        salt=identity.digest(),
        capacity_bytes=config.capacity_bytes,
        durability=config.durability,
        direct=config.direct_io,
        io_threads=config.io_threads,
        host_tier_bytes=config.host_tier_bytes,
    ))


def _tp_rank() -> int:
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():  # type: ignore[no-untyped-call]
        return int(parallel_state.get_tensor_model_parallel_rank())
    return 0


class UCMConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        served = vllm_config.model_config.served_model_name
        default_model = served if isinstance(served, str) else str(vllm_config.model_config.model)
        self.config = parse_extra_config(ktc.kv_connector_extra_config, default_model_id=default_model)
        if ktc.kv_load_failure_policy != "recompute":
            logger.warning(
                "UCM: setting kv_load_failure_policy=recompute (was %r): a block missing from the shared "
                "store is a cache miss to recompute, not a request failure", ktc.kv_load_failure_policy,
            )
            ktc.kv_load_failure_policy = "recompute"
        parallel = vllm_config.parallel_config
        for name in ("pipeline_parallel_size", "decode_context_parallel_size"):
            if getattr(parallel, name, 1) > 1:
                raise ValueError(
                    f"UCMConnector: {name}={getattr(parallel, name)} is not supported (a stored block holds "
                    "all layers and all tokens of its heads); use tensor parallelism"
                )
        self.identity = build_identity(vllm_config, self.config)
        self.store = open_configured_store(self.config, self.identity)
        sparse = None
        # window extrapolation is an attention algorithm of the same hook framework (config.py
        # refuses both at once)
        attention_config = self.config.ucm_sparse_config
        if self.config.ucm_window_config is not None:
            attention_config = {"name": "rerope", **self.config.ucm_window_config}
        if self.config.ucm_blend_config is not None:
            attention_config = {"name": "blend", **self.config.ucm_blend_config}
        if attention_config is not None:
            from ucm.sparse import create_sparse  # optional: only when sparse attention is configured

            sparse = create_sparse(
                attention_config,
                "scheduler" if role == KVConnectorRole.SCHEDULER else "worker",
                vllm_config,
            )
        # Sparse offload frees GPU blocks the store holds, so with it every role saves, generated
        # tokens' blocks included (a PD decode pod then writes the blocks it computes).
        offload = sparse is not None and sparse.offloads_to_store
        self.can_save = bool(ktc.is_kv_producer) or offload
        geo = self.identity.geometry
        logger.info(
            "UCM connector (%s, %s): store %s, identity %s", role.name, ktc.kv_role, self.config.store_path,
            self.identity.describe(),
        )
        self._scheduler: UCMSchedulerSide | None = None
        self._worker: UCMWorkerSide | None = None
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        if role == KVConnectorRole.SCHEDULER:
            # Refuse a TP size the stored head groups cannot serve here too, before any worker starts.
            plan_heads(geo.num_kv_heads, tp_size, 0, is_mla=geo.is_mla, max_tp_size=self.config.max_tp_size)
            group = canonical_group_size(geo.num_kv_heads, geo.is_mla, self.config.max_tp_size)
            self._scheduler = UCMSchedulerSide(
                identity=self.identity,
                store=self.store,
                head_groups=[(h, group) for h in range(0, geo.num_kv_heads, group)],
                can_save=self.can_save,
                produces_for_remote=ktc.kv_role == "kv_producer",
                save_generated=offload,
                load_async=self.config.load_mode == "async",
                sparse=sparse,
            )
        else:
            heads = plan_heads(
                geo.num_kv_heads, tp_size, _tp_rank(), is_mla=geo.is_mla, max_tp_size=self.config.max_tp_size
            )
            staging = int(os.environ.get(STAGING_ENV, DEFAULT_STAGING_BYTES))
            self._worker = UCMWorkerSide(
                store=self.store,
                heads=heads,
                can_save=self.can_save,
                layerwise_save=self.config.layerwise_save,
                pool=HostBufferPool(staging, timeout=STAGING_WAIT_S),
                sparse=sparse,
            )

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # wait_for_layer_load/save_kv_layer run between layers; a full CUDA graph would skip them.
        return True

    @property
    def requires_kv_delivery(self) -> bool:
        # A dropped save is a future cache miss, never lost output.
        return False

    @property
    def scheduler_side(self) -> UCMSchedulerSide:
        assert self._scheduler is not None, "scheduler-side method called on a worker connector"
        return self._scheduler

    @property
    def worker_side(self) -> UCMWorkerSide:
        assert self._worker is not None, "worker-side method called on a scheduler connector"
        return self._worker

    # ---- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        spec = self._cache_spec(kv_caches)
        self.worker_side.register_kv_caches(kv_caches, spec)

    def _cache_spec(self, kv_caches: dict[str, torch.Tensor]) -> CacheSpec:
        from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

        groups = [g for g in self._kv_cache_config.kv_cache_groups if set(g.layer_names) & set(kv_caches)]
        specs = {type(g.kv_cache_spec).__name__: g.kv_cache_spec for g in groups}
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
            raise ValueError(
                f"UCM supports models with one full-attention KV cache group; this model has {sorted(specs)} "
                "(start vLLM with --disable-hybrid-kv-cache-manager for models mixing attention types)"
            )
        spec = groups[0].kv_cache_spec
        return CacheSpec(
            num_blocks=self._kv_cache_config.num_blocks,
            block_size=spec.block_size,
            num_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            is_mla=isinstance(spec, MLAAttentionSpec),
        )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, UCMConnectorMetadata)
        self.worker_side.bind(connector_metadata)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._worker is not None:
            self._worker.bind(None)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker_side.start_load()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker_side.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        self.worker_side.save_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self.worker_side.finish_step()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving = self.worker_side.poll_finished(finished_req_ids)
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        self.store.close()

    # ---- scheduler side ------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler_side.kv_cache_manager = kv_cache_manager
        if self.scheduler_side.sparse is not None:
            self.scheduler_side.sparse.bind_kv_cache_manager(kv_cache_manager, self.scheduler_side)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler_side.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler_side.loads_finished(connector_output.finished_recving)
        self.scheduler_side.blocks_failed(connector_output.invalid_block_ids)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # True when the request's generated-token blocks are being saved: vLLM keeps them until
        # get_finished reports the request as finished sending.
        return self.scheduler_side.request_finished(request, block_ids)

    # ---- stats ---------------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._scheduler is not None:
            return self._scheduler.take_stats()
        return self.worker_side.stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return UCMConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        return UCMPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
