"""Cache blend inside vLLM 0.32: an algorithm of the attention hook framework (`ucm.sparse`).

Why through the hook framework: it already wraps vLLM's attention backends in one place, pinned to
vLLM 0.32 (`ucm.sparse.vllm_patch`), gets its configuration from the connector and is handed the
connector's reader of whole stored blocks. Cache blend needs three hooks besides attention, because
it changes which tokens a layer computes:
- `kv_cache_update` (the backend's `do_kv_cache_update`): reused tokens get their loaded, re-rotated
  K/V written instead of fresh ones; at the check layer the fresh K is compared first.
- `decoder_layer_forward` (the model's decoder layer): after the check layer only the selected
  tokens go on; the last layer hands every token back (unselected rows zero: vLLM only samples from
  the last prompt token, which is in the suffix and always selected).
- `attention_forward`: the selected tokens attend at their own positions (`ucm.blend.attention`).
Which part needs a patch of vLLM, and why: vLLM has no extension point that lets a connector drop
tokens between layers, so the decoder layer classes (Llama, Qwen2) are wrapped; that and the
attention wrappers are the whole patch, refused on any vLLM but 0.32.0.

Per step (scheduler -> workers): the scheduler half plans, for each request whose whole prompt is in
the step, the chunks the store holds (`ucm.blend.chunks`); the worker half reads their blocks when
the step starts and, layer by layer:
  layers < check: every token computed, reused tokens' cache entries = loaded KV;
  check layer:    every token computed; per request the top `recompute_ratio` of reused tokens by
                  K deviation are selected, the others keep loaded KV;
  layers > check: only selected tokens (and every token not reused: prefix tail, missed blocks,
                  separators' partial blocks, the suffix) are computed, over loaded + fresh KV.
So ratio 0 is naive reuse (reused tokens never recomputed) and ratio 1 is full recompute from the
check layer on. A read that fails leaves the step unblended (every token computed): never wrong KV.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ucm.blend.attention import subset_attention
from ucm.blend.chunks import BlendStep, plan_request
from ucm.blend.config import BlendConfig, BlendConfigError
from ucm.blend.select import deviation, rerotate, select_recompute, stored_kv
from ucm.sparse.base import (
    BlockReader,
    PendingBlocks,
    SparseConfigError,
    SparseRole,
    StoredBlocks,
    UcmSparseBase,
)
from ucm.store.base import StoreError
from ucm.transfer.paged import KVLayout
from ucm.window.rope import RopeSpec, RopeUnsupported

logger = logging.getLogger(__name__)

# the architectures whose decoder layers `ucm.sparse.vllm_patch.DECODER_LAYER_TARGETS` wraps
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# per-request kv_transfer_params: "ucm_blend": false turns blend off for the request (prefix hits
# only); "ucm_blend_ratio": a number in [0, 1] replaces the server's recompute_ratio for it
PARAM_BLEND = "ucm_blend"
PARAM_RATIO = "ucm_blend_ratio"


def request_ratio(params: Mapping[str, Any] | None, default: float) -> float | None:
    """The request's recompute ratio (None: not blended), or ValueError naming the bad parameter."""
    params = params or {}
    enabled = params.get(PARAM_BLEND, True)
    if not isinstance(enabled, bool):
        raise ValueError(f"kv_transfer_params.{PARAM_BLEND}: expected true or false, got {enabled!r}")
    if not enabled:
        return None
    ratio = params.get(PARAM_RATIO, default)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"kv_transfer_params.{PARAM_RATIO}: expected a number in [0, 1], got {ratio!r}")
    return float(ratio)


@dataclasses.dataclass
class _Step:
    """One forward pass's blend state on a worker."""

    plan: BlendStep
    read: PendingBlocks
    blocks: torch.Tensor | None = None  # [n, layers, heads, block_size, 2, head] as read
    batch_index: torch.Tensor | None = None  # [M] batch index of every reused token
    source: torch.Tensor | None = None  # [M] token row in the read blocks
    stored_pos: torch.Tensor | None = None
    new_pos: torch.Tensor | None = None
    groups: list[int] = dataclasses.field(default_factory=list)  # reused tokens per request
    num_tokens: int = 0
    failed: bool = False
    keep: torch.Tensor | None = None  # [M] bool: keeps its loaded KV past the check layer
    selected: torch.Tensor | None = None  # sorted batch indices computed past the check layer


class CacheBlend(UcmSparseBase):
    name = "blend"

    @classmethod
    def parse_config(cls, raw: Mapping[str, object]) -> BlendConfig:
        try:
            return BlendConfig.parse(raw)
        except BlendConfigError as e:
            raise SparseConfigError(str(e)) from None

    def __init__(self, config: BlendConfig, role: SparseRole, vllm_config: Any = None) -> None:
        super().__init__(config, role, vllm_config)
        self.blend: BlendConfig = config
        self.rope: RopeSpec | None = None
        self.num_layers = 0
        self.tp_size = 1
        self._stored: StoredBlocks | None = None
        self._reader: BlockReader | None = None
        self._step: _Step | None = None
        self._warned_split = False
        self._ratios: dict[str, float | None] = {}  # scheduler side: each request's ratio (None: off)
        self._counters = {"blend_reused_tokens": 0, "blend_recomputed_tokens": 0, "blend_failed_reads": 0}
        if vllm_config is not None:
            self.rope = self._rope_or_none(vllm_config)
            self.num_layers = int(vllm_config.model_config.hf_config.num_hidden_layers)
            self.tp_size = int(vllm_config.parallel_config.tensor_parallel_size)

    def _rope_or_none(self, vllm_config: Any) -> RopeSpec | None:
        """The model's RoPE, or None (prefix caching only) for a model blend cannot serve, said once."""
        model_config = vllm_config.model_config
        architectures = list(getattr(model_config, "architectures", None) or [])
        reason = ""
        if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            reason = (
                f"architecture {architectures} is not one whose decoder layers UCM hooks "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        else:
            try:
                rope = RopeSpec.from_hf_config(model_config.hf_config)
            except RopeUnsupported as e:
                reason = f"its RoPE cannot be re-rotated exactly ({e})"
            else:
                if self.blend.check_layer >= model_config.hf_config.num_hidden_layers - 1:
                    reason = (
                        f"ucm_blend_config.check_layer={self.blend.check_layer} leaves no layer to skip "
                        f"(the model has {model_config.hf_config.num_hidden_layers})"
                    )
                else:
                    logger.info(
                        "UCM cache blend (%s): separator %s, recompute ratio %g, check layer %d",
                        self.role.value, list(self.blend.separator_ids), self.blend.recompute_ratio,
                        self.blend.check_layer,
                    )
                    return rope
        logger.warning("UCM cache blend is off for this model, serving prefix hits only: %s", reason)
        return None

    # ---------------------------------------------------------------- scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager: Any, stored: StoredBlocks) -> None:
        self._stored = stored

    def request_begin(self, request: Any) -> None:
        try:
            ratio = request_ratio(request.kv_transfer_params, self.blend.recompute_ratio)
        except ValueError as e:  # a bad parameter costs the request its blend, never its answer
            logger.warning("UCM cache blend: request %s: %s; not blending it", request.request_id, e)
            ratio = None
        self._ratios[request.request_id] = ratio

    def request_finished(self, request: Any) -> None:
        self._ratios.pop(request.request_id, None)

    def build_sparse_meta(self, scheduler_output: Any) -> BlendStep | None:
        stored = self._stored
        if self.rope is None or stored is None:
            return None
        plans = []
        for new in scheduler_output.scheduled_new_reqs:
            prompt = new.prompt_token_ids
            if not prompt:
                continue
            computed = int(new.num_computed_tokens)
            if computed + int(scheduler_output.num_scheduled_tokens[new.req_id]) < len(prompt):
                if not self._warned_split:
                    self._warned_split = True
                    logger.warning(
                        "UCM cache blend: request %s's prompt (%d tokens) is split over several steps "
                        "(chunked prefill); blend needs it in one, so it gets prefix hits only. Raise "
                        "--max-num-batched-tokens above your longest prompt", new.req_id, len(prompt),
                    )
                continue
            req_id = new.req_id
            ratio = self._ratios.get(req_id, self.blend.recompute_ratio)
            if ratio is None:
                continue
            plan = plan_request(
                req_id, prompt, new.block_ids[0], computed, self.blend.separator_ids, ratio,
                lambda spans, rid=req_id: stored.stored_chunk_blocks(rid, spans),  # type: ignore[misc]
            )
            if plan is not None:
                plans.append(plan)
        return BlendStep(tuple(plans)) if plans else None

    # ---------------------------------------------------------------- worker side
    def register_block_reader(self, reader: BlockReader) -> None:
        self._reader = reader

    @property
    def replaces_attention(self) -> bool:
        return True

    @property
    def reshapes_batch(self) -> bool:
        return True

    def execute_begin(self, sparse_meta: object | None) -> None:
        self._step = None
        if not isinstance(sparse_meta, BlendStep) or self._reader is None or self.rope is None:
            return
        hashes = [h for r in sparse_meta.requests for c in r.chunks for h in c.block_hashes]
        try:
            read = self._reader.start_read(hashes)
        except StoreError as e:
            self._read_failed(e)
            return
        self._step = _Step(sparse_meta, read)

    def execute_finished(self) -> None:
        self._step = None

    def _read_failed(self, error: Exception) -> None:
        self._counters["blend_failed_reads"] += 1
        logger.warning("UCM cache blend: reading stored chunks failed, computing the step in full: %s", error)

    def _layer(self, layer_name: str) -> int:
        assert self._reader is not None
        return self._reader.layer_of(layer_name)

    def _prepare(self, step: _Step, slot_mapping: torch.Tensor, num_tokens: int) -> None:
        """At the step's first layer: the loaded blocks, and where each reused token sits in the
        batch (found by its KV slot, which the plan knows from the request's block ids)."""
        try:
            step.blocks = step.read.wait()
        except StoreError as e:
            step.failed = True
            self._read_failed(e)
            return
        block_size = step.blocks.shape[3]
        source, stored_pos, new_pos, slots = [], [], [], []
        row = 0
        for request in step.plan.requests:
            ids = torch.tensor(request.block_ids, dtype=torch.long)
            count = 0
            for chunk in request.chunks:
                n = chunk.num_tokens(block_size)
                rel = torch.arange(n, dtype=torch.long)
                pos = rel + chunk.start
                source.append(rel + row * block_size)
                stored_pos.append(rel)
                new_pos.append(pos)
                slots.append(ids[pos // block_size] * block_size + pos % block_size)
                row += len(chunk.block_hashes)
                count += n
            step.groups.append(count)
        device = slot_mapping.device
        wanted = torch.cat(slots).to(device)
        mapping = slot_mapping[:num_tokens].to(torch.long)
        order = torch.argsort(mapping)
        found = torch.searchsorted(mapping[order], wanted).clamp(max=num_tokens - 1)
        batch_index = order[found]
        if not torch.equal(mapping[batch_index], wanted):
            step.failed = True
            logger.warning("UCM cache blend: a planned request is not in this step's batch; computing in full")
            return
        step.batch_index, step.num_tokens = batch_index, num_tokens
        step.source = torch.cat(source).to(device)
        step.stored_pos, step.new_pos = torch.cat(stored_pos).to(device), torch.cat(new_pos).to(device)
        self._counters["blend_reused_tokens"] += int(wanted.numel())

    def _loaded(self, step: _Step, layer: int, layout: str, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's loaded K (re-rotated to the new positions) and V of every reused token."""
        assert step.blocks is not None and step.source is not None and self.rope is not None
        raw = step.blocks[:, layer]  # [n, heads, block_size, 2, head]
        k, v = stored_kv(raw.reshape(*raw.shape[:3], -1), KVLayout(layout), head_size)
        assert step.stored_pos is not None and step.new_pos is not None
        return rerotate(k[step.source], step.stored_pos, step.new_pos, self.rope), v[step.source]

    def kv_cache_update(
        self, layer_name: str, key: torch.Tensor, value: torch.Tensor, layout: str, slot_mapping: torch.Tensor,
        write: Callable[[torch.Tensor, torch.Tensor], None],
    ) -> None:
        step = self._step
        if step is not None and not step.failed and step.batch_index is None:
            self._prepare(step, slot_mapping, key.shape[0])
        if step is None or step.failed:
            write(key, value)
            return
        layer = self._layer(layer_name)
        check = self.blend.check_layer
        assert step.batch_index is not None
        if layer > check and step.selected is None:  # every token recomputed from the check layer on
            write(key, value)
            return
        loaded_k, loaded_v = self._loaded(step, layer, layout, key.shape[-1])
        if layer == check:
            self._select(step, key, loaded_k)
        if layer <= check:
            full_k, full_v = key.clone(), value.clone()
            index, keep = step.batch_index, slice(None)
            if layer == check:
                assert step.keep is not None
                index, keep = step.batch_index[step.keep], step.keep  # type: ignore[assignment]
        else:
            assert step.selected is not None and step.keep is not None
            full_k = key.new_empty((step.num_tokens, *key.shape[1:]))
            full_v = value.new_empty((step.num_tokens, *value.shape[1:]))
            full_k[step.selected], full_v[step.selected] = key, value
            index, keep = step.batch_index[step.keep], step.keep  # type: ignore[assignment]
        full_k[index] = loaded_k[keep].to(key.dtype)
        full_v[index] = loaded_v[keep].to(value.dtype)
        write(full_k, full_v)

    def _select(self, step: _Step, fresh_key: torch.Tensor, loaded_k: torch.Tensor) -> None:
        assert step.batch_index is not None
        dev = deviation(fresh_key[step.batch_index], loaded_k)
        if self.tp_size > 1:
            # every rank must pick the same tokens (the layers after run on the same subset), so
            # the deviation is summed over the heads of all ranks. Function-level: vLLM's process
            # groups exist only inside a vLLM worker.
            from vllm.distributed import get_tp_group

            dev = get_tp_group().all_reduce(dev)
        recompute = select_recompute(dev, step.groups, [r.recompute_ratio for r in step.plan.requests])
        self._counters["blend_recomputed_tokens"] += int(recompute.sum())
        step.keep = ~recompute
        if not bool(step.keep.any()):
            return  # everything recomputed: the layers after run as without blend
        computed = torch.ones(step.num_tokens, dtype=torch.bool, device=fresh_key.device)
        computed[step.batch_index[step.keep]] = False
        step.selected = computed.nonzero().squeeze(1)

    def attention_forward(
        self, layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor, layout: str, attn_metadata: Any,
        scale: float, output: torch.Tensor, run_kernel: Callable[[], object],
    ) -> None:
        step = self._step
        if step is None or step.selected is None or self._layer(layer_name) <= self.blend.check_layer:
            run_kernel()
            return
        subset_attention(query, step.selected, kv_cache, KVLayout(layout), attn_metadata, scale, output)

    def decoder_layer_forward(
        self, layer_name: str, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
        run_layer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._step
        if step is None or step.failed:
            return run_layer(positions, hidden_states, residual)
        layer = self._layer(layer_name)
        if layer <= self.blend.check_layer:
            hidden, res = run_layer(positions, hidden_states, residual)
            if layer == self.blend.check_layer and step.selected is not None:
                return hidden[step.selected], res[step.selected]
            return hidden, res
        selected = step.selected
        if selected is None:
            return run_layer(positions, hidden_states, residual)
        hidden, res = run_layer(positions[selected], hidden_states, residual)
        if layer < self.num_layers - 1:
            return hidden, res
        full_hidden = hidden.new_zeros((positions.shape[0], *hidden.shape[1:]))
        full_res = res.new_zeros((positions.shape[0], *res.shape[1:]))
        full_hidden[selected], full_res[selected] = hidden, res
        return full_hidden, full_res

    def take_counters(self) -> dict[str, int]:
        counters = {k: v for k, v in self._counters.items() if v}
        self._counters = dict.fromkeys(self._counters, 0)
        return counters

