"""A tiny causal byte-level transformer, trained here, so the sparse bench sees real decode attention.

Why: the accuracy goal of `ucm bench sparse` is about *decode* attention — one new token attending
causally over everything before it. A trained bidirectional encoder (all-MiniLM-L6-v2) has real
Q/K statistics but is not a decoder: its attention was never trained to predict the next token.
This model is: decoder-only, rotary position embeddings (RoPE, as Llama-family models), grouped
query attention (2 query heads per KV head), bytes as tokens so no tokenizer is needed.

Where its training data comes from: the source files of Python's own standard library — present
offline wherever this project runs. Training is deterministic (fixed seed, fixed thread count,
sampling from a seeded generator) and runs for a fixed number of steps; the result is cached in
`~/.cache/ucm/tiny_lm/<key>.pt`, the key hashing the config, the corpus bytes, the torch version
and `TRAIN_CODE_VERSION`, so the bench trains once per machine and retrains when any of them
changes. Bits per byte (8.0 = uniform over bytes) on the training stream and on held-out files
shows that it learned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

TRAIN_CODE_VERSION = 1  # bump when training or model code changes what a config trains into
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
    """Model size and the (deterministic) training recipe."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    context: int = 2048  # tokens (bytes) per training sequence; the decode replay uses this length
    mlp_mult: int = 4
    rope_base: float = 10000.0
    steps: int = 600  # ~5 minutes on two cores of a 2020s x86 CPU
    batch: int = 2
    lr: float = 6e-3
    warmup: int = 30
    seed: int = 0
    threads: int = 2  # fixed: a different thread count can change float reductions

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"TinyLMConfig: d_model ({self.d_model}) must split into n_heads ({self.n_heads}) even-sized "
                f"heads and n_heads must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope_tables(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] for rotate-half RoPE."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] by position (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, c: TinyLMConfig) -> None:
        super().__init__()
        self.c = c
        kv = c.n_kv_heads * c.head_dim
        self.norm1 = nn.LayerNorm(c.d_model)
        self.wq = nn.Linear(c.d_model, c.d_model, bias=False)
        self.wk = nn.Linear(c.d_model, kv, bias=False)
        self.wv = nn.Linear(c.d_model, kv, bias=False)
        self.wo = nn.Linear(c.d_model, c.d_model, bias=False)
        self.norm2 = nn.LayerNorm(c.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(c.d_model, c.mlp_mult * c.d_model), nn.GELU(), nn.Linear(c.mlp_mult * c.d_model, c.d_model)
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, capture: list[tuple[torch.Tensor, ...]] | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.c
        h = self.norm1(x)
        q = self.wq(h).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if capture is not None:  # token-major [T, heads, D] of the first sequence: what a KV cache holds
            capture.append(tuple(z[0].transpose(0, 1).detach().clone() for z in (q, k, v)))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, c.d_model))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class TinyCausalLM(nn.Module):
    """Byte-level decoder: embedding, pre-norm blocks, tied output head."""

    def __init__(self, c: TinyLMConfig) -> None:
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(256, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        cos, sin = rope_tables(c.context, c.head_dim, c.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx: torch.Tensor, capture: list[tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
        """Logits [B, T, 256]; with `capture`, appends each layer's (q, k, v) after RoPE."""
        t = idx.shape[1]
        if t > self.c.context:
            raise ValueError(f"TinyCausalLM: {t} tokens exceed the trained context {self.c.context}")
        x = self.embed(idx)
        cos, sin = self.get_buffer("cos")[:t], self.get_buffer("sin")[:t]
        for block in self.blocks:
            x = block(x, cos, sin, capture)
        logits: torch.Tensor = self.norm(x) @ self.embed.weight.T
        return logits


def stdlib_corpus() -> tuple[bytes, bytes]:
    """(train, held_out) bytes: the top-level `.py` files of this Python's standard library, sorted
    by name; every 10th file is held out. Deterministic for a given Python build."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.is_file())
    if len(files) < 20:
        raise RuntimeError(f"tiny_lm corpus: only {len(files)} .py files in the standard library at {lib}")
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        (held if i % 10 == 9 else train).extend(path.read_bytes() + b"\n\n")
    return bytes(train), bytes(held)


def cache_key(config: DataclassInstance, corpus: bytes) -> str:
    """Hex key of everything that determines the trained weights (any dataclass config: the serving
    models trained here, ucm.serve.train_window, key their caches the same way)."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    h.update(hashlib.sha256(corpus).digest())
    h.update(f"torch={torch.__version__.split('+')[0]} code={TRAIN_CODE_VERSION}".encode())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get("UCM_CACHE_DIR", Path.home() / ".cache" / "ucm")) / "tiny_lm"


class Schedule(Protocol):
    @property
    def lr(self) -> float: ...
    @property
    def warmup(self) -> int: ...
    @property
    def steps(self) -> int: ...


def lr_at(c: Schedule, step: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    progress = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@dataclasses.dataclass
class TrainedLM:
    model: TinyCausalLM
    log: dict[str, Any]  # losses in bits per byte, seconds, tokens seen, whether loaded from cache


def train(config: TinyLMConfig, corpus: bytes, *, progress_every: int = 0) -> TrainedLM:
    """Train from scratch, deterministically: same config + corpus + torch -> same weights."""
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    if data.numel() <= config.context + 1:
        raise ValueError(f"tiny_lm: corpus of {data.numel()} bytes is shorter than one context ({config.context})")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        model = TinyCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(config.seed + 1)
        bpb: list[float] = []
        started = time.perf_counter()
        for step in range(config.steps):
            starts = torch.randint(0, data.numel() - config.context - 1, (config.batch,), generator=gen)
            window = torch.stack([data[s : s + config.context + 1] for s in starts.tolist()])
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = lr_at(config, step)
            opt.step()
            bpb.append(float(loss.detach()) / LN2)
            if progress_every and (step + 1) % progress_every == 0:
                recent = bpb[-progress_every:]
                print(f"tiny_lm: step {step + 1}/{config.steps} train {sum(recent) / len(recent):.3f} bits/byte "
                      f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
        tail = bpb[-max(1, config.steps // 10) :]
        log = {"train_s": round(time.perf_counter() - started, 1), "steps": config.steps,
               "tokens_seen": config.steps * config.batch * config.context,
               "first_step_bits_per_byte": round(bpb[0], 3), "final_train_bits_per_byte": round(sum(tail) / len(tail), 3),
               "bits_per_byte_curve": [round(x, 3) for x in bpb[:: max(1, config.steps // 20)]]}
        return TrainedLM(model.eval(), log)
    finally:
        torch.set_num_threads(threads)


def load_or_train(config: TinyLMConfig, *, progress_every: int = 50) -> TrainedLM:
    """The cached model for `config` on this machine's corpus, training (once) when it is missing."""
    corpus, _ = stdlib_corpus()
    path = cache_dir() / f"{cache_key(config, corpus)}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        model = TinyCausalLM(config)
        model.load_state_dict(saved["state_dict"])
        log = json.loads(saved["log"])
        return TrainedLM(model.eval(), {**log, "cached": True, "cache_file": str(path)})
    print(f"tiny_lm: training {config} on {len(corpus)} bytes of stdlib source (cached in {path})",
          file=sys.stderr, flush=True)
    trained = train(config, corpus, progress_every=progress_every)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": trained.model.state_dict(), "log": json.dumps(trained.log)}, tmp)
    tmp.replace(path)  # atomic: a concurrent reader sees the whole file or none
    trained.log = {**trained.log, "cached": False, "cache_file": str(path)}
    return trained


if __name__ == "__main__":  # pragma: no cover - `python -m ucm.bench.tiny_lm`: train and cache the default model
    result = load_or_train(TinyLMConfig())
    print(json.dumps(result.log))
