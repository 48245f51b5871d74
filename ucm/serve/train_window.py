"""`window-llama`: the project's own small Llama, trained here with a SHORT context (`TRAINED_WINDOW`).

Why: window extrapolation (ReRoPE) needs a model whose trained window is known and short, so that
`ucm bench window` can show plain RoPE breaking down beyond it (positions the model never saw) and
ReRoPE holding up. SmolLM2 was trained to 8k, far beyond what a CPU bench can afford to exceed.

What it is: a real `LlamaForCausalLM` directory (config.json, safetensors, SmolLM2's tokenizer files)
that `vllm serve` loads — 4 layers, hidden 256, 4 query heads of head_dim 64 (vLLM's CPU kernels refuse
smaller heads), 2 KV heads, plain RoPE (theta 10000, no scaling), tied embeddings. config.json says
`max_position_embeddings = TRAINED_WINDOW` because that is all it was trained on; serving longer
prompts needs `--hf-overrides '{"max_position_embeddings": N}'`.

How it is trained: its token embeddings start from SmolLM2's, projected onto their top `hidden_size`
principal directions (a from-scratch 49k-token embedding does not get past unigram statistics in the
few hundred steps two CPU cores allow); everything else starts from a fixed seed. It trains on the top-level `.py` files of Python's standard library (ucm.bench.tiny_lm's
corpus: sorted by name, every 10th file held out), tokenized with SmolLM2's tokenizer, on random
`TRAINED_WINDOW`-token windows of the training stream — fixed seed, fixed thread count, fixed step
count, so the same inputs train the same weights. The build is keyed (ucm.bench.tiny_lm.cache_key) by
the config, the corpus, the tokenizer files, SmolLM2's embeddings, the torch and transformers versions and
`TRAIN_CODE_VERSION`; ucm.serve.models rebuilds the directory only when that key changes.
`training.json` in the model directory records what happened: seconds, train loss, held-out loss in
nats/token by position bucket inside the window and beyond it, and a unigram baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

TRAINED_WINDOW = 256  # tokens per training sequence: the model has never seen a position >= this
TRAIN_CODE_VERSION = 1  # bump when training or model code changes what a config trains into
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EVAL_LENGTHS = (TRAINED_WINDOW, 1024)
# position buckets for held-out loss: [start, end) token positions within a sequence
BUCKETS = ((0, 64), (64, 128), (128, 256), (256, 512), (512, 768), (768, 1024))
EVAL_TOKENS = 32 * 1024  # held-out tokens scored at each eval length (the same text for each)


@dataclasses.dataclass(frozen=True)
class WindowLlamaConfig:
    """Model size and the (deterministic) training recipe."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64  # vLLM's CPU attention kernels refuse head_dim 16
    rope_theta: float = 10000.0
    window: int = TRAINED_WINDOW
    steps: int = 160  # ~0.65 s a step on two idle cores; 890 s in all when others loaded them (load ~10)
    batch: int = 4
    lr: float = 3e-3
    warmup: int = 10
    embed_scale: float = 0.25  # SmolLM2's projected embeddings shrunk so the first logits are near uniform
    seed: int = 0
    threads: int = 2  # fixed: a different thread count can change float reductions

    def __post_init__(self) -> None:
        if self.num_attention_heads * self.head_dim != self.hidden_size or \
                self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"WindowLlamaConfig: {self.num_attention_heads} heads of {self.head_dim} must make hidden_size "
                f"{self.hidden_size}, and be a multiple of num_key_value_heads {self.num_key_value_heads}"
            )


def llama_config(c: WindowLlamaConfig, vocab_size: int, bos_token_id: int, eos_token_id: int) -> LlamaConfig:
    """The HF config written to config.json: plain RoPE and an honest max_position_embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.window,  # what it was trained on; longer needs an explicit override
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},  # no scaling
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )


def smollm2_embedding(smollm2_dir: Path) -> torch.Tensor:
    """SmolLM2's (tied) token embedding matrix [vocab, 576]."""
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as weights:
        embedding: torch.Tensor = weights.get_tensor("model.embed_tokens.weight")
    return embedding


def projected_embedding(embedding: torch.Tensor, dims: int, scale: float) -> torch.Tensor:
    """`embedding` on its top `dims` (uncentred) principal directions, largest first, each direction's
    sign fixed (its largest component positive) so the result does not depend on the eigensolver."""
    import torch

    _, vectors = torch.linalg.eigh(embedding.T.double() @ embedding.double())  # ascending eigenvalues
    top = vectors[:, -dims:].flip(-1)
    top = top * top.gather(0, top.abs().argmax(0, keepdim=True)).sign()
    projected: torch.Tensor = (embedding.double() @ top * scale).float().contiguous()
    return projected


def build_key(c: WindowLlamaConfig, smollm2_dir: Path) -> str:
    """Hex key of everything that determines the trained weights."""
    import transformers

    from ucm.bench.tiny_lm import cache_key, stdlib_corpus

    train, held = stdlib_corpus()
    inputs = hashlib.sha256()
    for part in (train, held, *((smollm2_dir / name).read_bytes() for name in TOKENIZER_FILES),
                 smollm2_embedding(smollm2_dir).numpy().tobytes()):
        inputs.update(hashlib.sha256(part).digest())
    inputs.update(f"transformers={transformers.__version__} window-code={TRAIN_CODE_VERSION}".encode())
    return cache_key(c, inputs.digest())


def tokenized_corpus(tokenizer_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) token ids of the stdlib corpus, one stream each."""
    import torch
    from transformers import AutoTokenizer

    from ucm.bench.tiny_lm import stdlib_corpus

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    streams = []
    for part in stdlib_corpus():
        ids = tokenizer(part.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        streams.append(torch.tensor(ids, dtype=torch.long))
    return streams[0], streams[1]


def loss_by_position(model: LlamaForCausalLM, held: torch.Tensor, length: int, tokens: int = EVAL_TOKENS,
                     buckets: tuple[tuple[int, int], ...] = BUCKETS) -> dict[str, float]:
    """Mean next-token loss (nats/token) on held-out text cut into `length`-token sequences, by the
    position of the predicted token within its sequence: bucket "a-b" covers positions a..b-1."""
    import torch
    from torch.nn import functional as F

    n_seqs = min(tokens, held.numel() - 1) // length
    if n_seqs < 1:
        raise ValueError(f"loss_by_position: {held.numel()} held-out tokens are fewer than one {length}-token sequence")
    total = torch.zeros(length - 1, dtype=torch.float64)
    per_batch = max(1, 2048 // length)
    with torch.no_grad():
        for first in range(0, n_seqs, per_batch):
            rows = range(first, min(n_seqs, first + per_batch))
            x = torch.stack([held[r * length : (r + 1) * length] for r in rows])
            logits = model(input_ids=x).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            total += nll.view(len(rows), length - 1).sum(0).double()
    mean = total / n_seqs  # index i scores the token at position i + 1
    out = {"all": round(float(mean.mean()), 4), "sequences": float(n_seqs)}
    for a, b in buckets:
        lo, hi = max(a, 1) - 1, min(b, length) - 1
        if lo < hi:
            out[f"{a}-{b}"] = round(float(mean[lo:hi].mean()), 4)
    return out


def unigram_loss(train: torch.Tensor, held: torch.Tensor, vocab_size: int) -> float:
    """Held-out nats/token of the add-one unigram distribution of the training stream: the baseline
    a model that ignores context would reach."""
    import torch

    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return round(float(-logp[held].mean()), 4)


def train(c: WindowLlamaConfig, config: LlamaConfig, data: torch.Tensor, embedding: torch.Tensor | None = None, *,
          progress_every: int = 20) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train from scratch, deterministically: same config + data + torch -> same weights."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    from transformers import LlamaForCausalLM

    from ucm.bench.tiny_lm import lr_at

    if data.numel() <= c.window + 1:
        raise ValueError(f"window-llama: {data.numel()} training tokens are fewer than one window ({c.window})")
    threads = torch.get_num_threads()
    torch.set_num_threads(c.threads)
    try:
        torch.manual_seed(c.seed)
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
        if embedding is not None:  # tied: this is the output head too
            with torch.no_grad():
                model.model.embed_tokens.weight.copy_(embedding)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(c.seed + 1)
        losses: list[float] = []
        started = time.perf_counter()
        for step in range(c.steps):
            starts = torch.randint(0, data.numel() - c.window - 1, (c.batch,), generator=gen)
            window = torch.stack([data[s : s + c.window + 1] for s in starts.tolist()])
            logits = model(input_ids=window[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in opt.param_groups:
                group["lr"] = lr_at(c, step)
            opt.step()
            losses.append(float(loss.detach()))
            if progress_every and (step + 1) % progress_every == 0:
                recent = losses[-progress_every:]
                print(f"window-llama: step {step + 1}/{c.steps} train {sum(recent) / len(recent):.3f} nats/token "
                      f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
        tail = losses[-max(1, c.steps // 10) :]
        log = {"train_s": round(time.perf_counter() - started, 1), "steps": c.steps, "batch": c.batch,
               "tokens_seen": c.steps * c.batch * c.window, "first_step_loss": round(losses[0], 4),
               "final_train_loss": round(sum(tail) / len(tail), 4),
               "train_loss_curve": [round(x, 3) for x in losses[:: max(1, c.steps // 20)]]}
        model.eval()  # type: ignore[no-untyped-call]
        return model, log
    finally:
        torch.set_num_threads(threads)


def build(out: Path, smollm2_dir: Path, c: WindowLlamaConfig | None = None) -> str:
    """Train window-llama into the (empty) directory `out`; returns its build key."""
    import torch
    from transformers import AutoTokenizer

    c = c or WindowLlamaConfig()
    key = build_key(c, smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = llama_config(c, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    began = time.perf_counter()
    train_ids, held_ids = tokenized_corpus(smollm2_dir)
    tokenize_s = time.perf_counter() - began
    print(f"window-llama: training {c} on {train_ids.numel()} stdlib tokens ({held_ids.numel()} held out)",
          file=sys.stderr, flush=True)
    embedding = projected_embedding(smollm2_embedding(smollm2_dir), c.hidden_size, c.embed_scale)
    model, log = train(c, config, train_ids, embedding)
    if not math.isfinite(log["final_train_loss"]):
        raise RuntimeError(f"window-llama: training diverged (final train loss {log['final_train_loss']})")
    began = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(c.threads)
    try:
        held_out = {str(length): loss_by_position(model, held_ids, length) for length in EVAL_LENGTHS}
    finally:
        torch.set_num_threads(threads)
    facts = {
        "model": "window-llama", "key": key, "trained_window": c.window, "recipe": dataclasses.asdict(c),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {"train_tokens": train_ids.numel(), "held_out_tokens": held_ids.numel(),
                   "source": "top-level .py files of the Python standard library, every 10th file held out"},
        "embedding_init": f"SmolLM2's, top {c.hidden_size} principal directions, x{c.embed_scale}",
        "torch": torch.__version__, **log, "tokenize_s": round(tokenize_s, 1),
        "unigram_held_out_loss": unigram_loss(train_ids, held_ids, config.vocab_size),
        "held_out_loss_by_position": held_out, "eval_s": round(time.perf_counter() - began, 1),
        "units": "nats/token",
    }
    model.save_pretrained(out)  # float32: torch's default dtype
    for name in TOKENIZER_FILES:
        shutil.copyfile(smollm2_dir / name, out / name)
    (out / "training.json").write_text(json.dumps(facts, indent=1) + "\n")
    return key
