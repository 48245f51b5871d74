"""ReRoPE as an algorithm of the attention hook framework: what vLLM's attention backend calls.

Why through the hook framework: it already wraps every backend's `forward` in one place (pinned to
vLLM 0.32, eager and compiled paths alike, `ucm.sparse.vllm_patch`) and gets its configuration from
the connector; window extrapolation only needs the one extra hook `attention_forward`, which lets an
algorithm compute attention itself. The connector creates it from `ucm_window_config`.

Per step and layer: rows whose sequence fits in the window run the backend's own kernel (so a
prompt no longer than the window is served exactly as without ReRoPE, bit for bit); longer rows
are computed by `ucm.window.paged.paged_rerope` from the layer's paged cache. The cost past the
window is a torch computation instead of the fused kernel (measured by `ucm bench window`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ucm.sparse.base import SparseConfigError, SparseRole, UcmSparseBase
from ucm.transfer.paged import KVLayout
from ucm.window.config import WindowConfig, WindowConfigError
from ucm.window.paged import long_rows, paged_rerope
from ucm.window.rope import RopeSpec, RopeUnsupported

logger = logging.getLogger(__name__)


class ReRopeAttention(UcmSparseBase):
    name = "rerope"

    @classmethod
    def parse_config(cls, raw: Mapping[str, object]) -> WindowConfig:
        try:
            return WindowConfig.parse(raw)
        except WindowConfigError as e:
            raise SparseConfigError(str(e)) from None

    def __init__(self, config: WindowConfig, role: SparseRole, vllm_config: Any = None) -> None:
        super().__init__(config, role, vllm_config)
        self.window: WindowConfig = config
        self.rope: RopeSpec | None = None
        self._rerope_queries = 0
        self._counting_layer: str | None = None  # the first layer seen: count queries once per step
        if vllm_config is not None:
            hf_config = vllm_config.model_config.hf_config
            try:
                self.rope = RopeSpec.from_hf_config(hf_config)
            except RopeUnsupported as e:
                raise SparseConfigError(f"ucm_window_config: ReRoPE cannot serve this model: {e}") from None
            window = getattr(hf_config, "sliding_window", None)
            if window:
                raise SparseConfigError(
                    f"ucm_window_config: the model uses a sliding window ({window}); ReRoPE needs full attention"
                )
            logger.info("UCM window extrapolation: %s (%s) on %s", config.method, config.identity(), role.value)

    @property
    def replaces_attention(self) -> bool:
        return True

    def attention_forward(
        self, layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor, layout: str, attn_metadata: Any,
        scale: float, output: torch.Tensor, run_kernel: Callable[[], object],
    ) -> None:
        rows = long_rows(attn_metadata, self.window.window)
        if len(rows) < attn_metadata.seq_lens.numel():
            run_kernel()  # rows inside the window (all, usually) are plain attention
        if not rows:
            return
        if self.rope is None:
            raise SparseConfigError("ucm_window_config: ReRoPE was created without the model config (worker side)")
        paged_rerope(query, kv_cache, KVLayout(layout), attn_metadata, rows, self.rope, self.window, scale, output)
        if self._counting_layer is None:
            self._counting_layer = layer_name
        if layer_name == self._counting_layer:
            qsl = attn_metadata.query_start_loc.tolist()
            self._rerope_queries += sum(qsl[r + 1] - qsl[r] for r in rows)

    def take_counters(self) -> dict[str, int]:
        queries, self._rerope_queries = self._rerope_queries, 0
        return {"rerope_queries": queries} if queries else {}
