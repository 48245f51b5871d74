"""A Hugging Face Llama whose attention is `ucm.window.rerope.rerope_attention`: the reference the
real vLLM engine is compared with. Transformers applies the model's RoPE, then calls the registered
attention function with rotated q/k of one unpadded sequence: keys at 0..T-1 (its cache), queries
the last ones (the whole prompt, then one token per generation step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface, LlamaForCausalLM

from ucm.window.config import WindowConfig
from ucm.window.rerope import rerope_attention
from ucm.window.rope import RopeSpec

_CONFIG: dict[str, Any] = {}


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    positions = torch.arange(k.shape[0] - q.shape[0], k.shape[0])
    out = rerope_attention(q, k, v, positions, _CONFIG["rope"], _CONFIG["window"],
                           float(scaling if scaling is not None else q.shape[-1] ** -0.5))
    return out.unsqueeze(0), None  # [1, T, H, D]


AttentionInterface.register("ucm_rerope", _attention)


def load(model_dir: Path, window: WindowConfig | None) -> LlamaForCausalLM:
    """The model with ReRoPE attention (`window`) or plain sdpa."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                             attn_implementation="ucm_rerope" if window else "sdpa").eval()
    if window is not None:
        _CONFIG.update(rope=RopeSpec.from_hf_config(model.config), window=window)
    return model


def prompt_logprobs(model: LlamaForCausalLM, token_ids: list[int]) -> list[float]:
    """Log-probability of each prompt token after the first."""
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0].tolist()


def greedy(model: LlamaForCausalLM, token_ids: list[int], n: int) -> list[int]:
    """`n` greedily generated token ids (one decode step each, through the model's KV cache)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([token_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return [int(t) for t in out[0, len(token_ids):]]
