"""A tiny randomly initialised Hugging Face Llama as the model behind the test engine, and the glue
between vLLM's paged KV cache ([blocks, heads, block_size, K|V] per layer) and HF past_key_values."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from ucm_connector_harness import HEAD, LAYERS, TINY_LLAMA


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.eval().float()


def paged_to_past(per_layer: list[torch.Tensor]) -> DynamicCache:
    """Per-layer [tokens, heads, 2D] KV read from the paged cache -> an HF DynamicCache."""
    cache = DynamicCache()
    for li, kv in enumerate(per_layer):
        keys = kv[..., :HEAD].permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, H, T, D]
        values = kv[..., HEAD:].permute(1, 0, 2).unsqueeze(0).contiguous()
        cache.update(keys, values, li)
    return cache


def past_tail(cache: DynamicCache, start: int) -> list[torch.Tensor]:
    """KV of positions >= start from an HF cache, per layer as [n, heads, 2D] (the paged format)."""
    out = []
    for li in range(len(LAYERS)):
        layer = cache.layers[li]
        k, v = layer.keys[0, :, start:], layer.values[0, :, start:]  # [H, n, D]
        out.append(torch.cat([k, v], dim=-1).permute(1, 0, 2))
    return out


class HFRunner:
    """Runs the scheduled tokens of each request through the model with the KV of the earlier
    positions taken from the paged cache (loaded from UCM or computed by earlier steps)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, engine: Any, so: Any) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
        results = {}
        for rid, n in so.num_scheduled_tokens.items():
            req = engine.requests[rid]
            start = req.num_computed_tokens - n
            tokens = torch.tensor([list(req.all_token_ids[start : start + n])])
            past = paged_to_past(engine.block_kv(rid, start)) if start else DynamicCache()
            out = self.model(input_ids=tokens, past_key_values=past, use_cache=True)
            results[rid] = (past_tail(out.past_key_values, start), out.logits[0])
        return results


@torch.no_grad()
def recompute_logits(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Logits of every position from scratch (no cache): the reference."""
    return model(input_ids=torch.tensor([tokens])).logits[0]
