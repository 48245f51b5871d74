"""`ucm bench window`: loss per position past the trained window, through real `vllm serve` processes.

What it measures: a model's next-token loss (negative log-likelihood, nats per token) on long
natural text that ships with Python — `pydoc_data/topics.py`, the language reference's prose, cut
into non-overlapping documents of `factor` x the trained window — bucketed by position: two buckets
inside the trained window, then one per further window length. Side by side, one server per row,
in one run:
  plain-rope    the model's own RoPE, its position table merely extended (hf-overrides)
  vllm-yarn     vLLM's own rope scaling (YaRN, factor = the extension), the usual fix
  rerope        UCM's ReRoPE (`ucm_window_config`), window w = trained/2, log scaling
  leaky-rerope  the same with leak k (far distances grow as w + (d - w)/k), k chosen so the
                longest distance scores as at most the trained length
Each row reads vLLM's `prompt_logprobs` (every prompt position computed, none loaded), so the loss
is the engine's own. Cost: prompt tokens per second of each row, and KV bytes per token (ReRoPE
stores nothing extra: it re-derives un-rotated K from the cached K at read time).

Goals (issue 17): at 2x-4x the trained window, ReRoPE's loss stays within 5% of its loss in the
second half of the window, and beats vLLM's rope scaling in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ucm.serve.server import VllmServer, ucm_transfer_config

GOAL_RATIO = 1.05  # ReRoPE's loss past the window / its loss in the window's second half


@dataclass(frozen=True)
class Settings:
    model: Path
    model_name: str
    trained: int  # tokens the model was trained for (its config's max_position_embeddings)
    factor: int
    docs: int
    rows: tuple[str, ...]
    work_dir: Path
    keep: bool
    json: str | None

    @property
    def length(self) -> int:
        return self.trained * self.factor


@dataclass
class Row:
    name: str
    detail: str
    losses: list[list[float]] = field(default_factory=list)  # per document: NLL of positions 1..N-1
    seconds: list[float] = field(default_factory=list)
    error: str = ""

    def buckets(self, trained: int, factor: int) -> list[tuple[str, float]]:
        """Mean NLL per position bucket over all documents: [0, W/2), [W/2, W), [W, 2W), ..."""
        edges = [(0, trained // 2), (trained // 2, trained)] + [(k * trained, (k + 1) * trained) for k in range(1, factor)]
        out = []
        for lo, hi in edges:
            values = [nll for doc in self.losses for pos, nll in enumerate(doc, start=1) if lo <= pos < hi]
            out.append((f"{lo}-{hi}", sum(values) / len(values) if values else math.nan))
        return out


def documents(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` non-overlapping documents of `length` tokens of the Python language reference."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # a module of one dict of prose
    text = "\n\n".join(namespace["topics"][k] for k in sorted(namespace["topics"]))
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < count * length:
        raise SystemExit(f"{path}: {len(ids)} tokens, fewer than {count} documents of {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def row_configs(s: Settings, theta: float) -> dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """name -> (what it is, hf-overrides, ucm_window_config)."""
    positions = {"max_position_embeddings": s.length + 64}
    window = s.trained // 2
    leak = math.ceil((s.length - window) / (s.trained - window))  # longest distance scores as <= trained
    log = {"log_scale": True, "trained_length": s.trained}
    yarn = {"rope_type": "yarn", "factor": float(s.factor), "original_max_position_embeddings": s.trained,
            "rope_theta": theta}
    return {
        "plain-rope": ("the model's RoPE, position table extended", positions, None),
        "vllm-yarn": (f"vLLM YaRN rope scaling, factor {s.factor}", {**positions, "rope_parameters": yarn}, None),
        "rerope": (f"UCM ReRoPE w={window}, log scaling", positions, {"window": window, **log}),
        "leaky-rerope": (f"UCM leaky ReRoPE w={window} k={leak}, log scaling", positions,
                         {"window": window, "leak": leak, **log}),
    }


def prompt_nll(url: str, ids: list[int]) -> list[float]:
    reply = httpx.post(url + "/v1/completions", timeout=7200, json={
        "model": "model", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    reply.raise_for_status()
    entries = reply.json()["choices"][0]["prompt_logprobs"][1:]
    return [-float(next(iter(e.values()))["logprob"]) for e in entries]


def run_row(s: Settings, name: str, detail: str, overrides: dict[str, Any], window: dict[str, Any] | None,
            docs: list[list[int]]) -> Row:
    row = Row(name, detail)
    extra = {"ucm_window_config": window} if window is not None else {}
    server = VllmServer(
        model=s.model, log_dir=s.work_dir / "logs", name=name, max_model_len=s.length + 64, kv_cache_gib=4,
        cpu_threads=2, kv_transfer_config=ucm_transfer_config("kv_consumer", s.work_dir / name, s.model_name, **extra),
        extra_args=["--hf-overrides", json.dumps(overrides), "--max-num-seqs", "1"],
    )
    print(f"{name}: starting ...", file=sys.stderr, flush=True)
    try:
        server.start().wait_ready()
        for i, doc in enumerate(docs):
            started = time.perf_counter()
            row.losses.append(prompt_nll(server.url, doc))
            row.seconds.append(time.perf_counter() - started)
            print(f"{name}: document {i + 1}/{len(docs)} in {row.seconds[-1]:.0f} s", file=sys.stderr, flush=True)
    except Exception as exc:  # a failed row is reported, the other rows still run
        row.error = f"{type(exc).__name__}: {exc}"
        print(f"FAILED {name}: {row.error}\n{server.log_tail()}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return row


def report(s: Settings, rows: list[Row], kv_bytes_per_token: int) -> tuple[str, dict[str, Any]]:
    heads = [label for label, _ in Row("", "").buckets(s.trained, s.factor)]
    lines = [
        f"ucm bench window: {s.model_name} (trained window {s.trained}), {s.docs} document(s) of {s.length} tokens "
        "of Python's language reference, NLL in nats/token by position (prompt_logprobs of real vllm serve)",
        f"{'row':<14}" + "".join(f"{h:>13}" for h in heads) + f"{'tokens/s':>10}  detail",
    ]
    summaries: list[dict[str, Any]] = []
    for row in rows:
        if row.error:
            lines.append(f"{row.name:<14}FAILED: {row.error}")
            summaries.append({"name": row.name, "error": row.error})
            continue
        buckets = row.buckets(s.trained, s.factor)
        rate = s.length * len(row.seconds) / sum(row.seconds)
        lines.append(f"{row.name:<14}" + "".join(f"{v:>13.3f}" for _, v in buckets) + f"{rate:>10.0f}  {row.detail}")
        summaries.append({"name": row.name, "detail": row.detail, "buckets": dict(buckets), "tokens_per_s": rate,
                          "seconds": row.seconds})
    lines.append(f"KV bytes per token: {kv_bytes_per_token} for every row (ReRoPE keeps only the rotated K)")
    goals = []
    by_name = {r.name: r for r in rows if not r.error}
    for name in ("rerope", "leaky-rerope"):
        if name not in by_name:
            continue
        buckets = by_name[name].buckets(s.trained, s.factor)
        inside = buckets[1][1]
        for label, value in buckets[2:]:
            ratio = value / inside
            goals.append({"name": f"{name} {label} within 5% of its window loss", "met": ratio <= GOAL_RATIO,
                          "detail": f"{value:.3f} vs {inside:.3f} ({ratio:.3f}x)"})
        if "vllm-yarn" in by_name:
            yarn = by_name["vllm-yarn"].buckets(s.trained, s.factor)
            for (label, value), (_, base) in list(zip(buckets, yarn, strict=True))[2:]:
                goals.append({"name": f"{name} {label} beats vLLM YaRN", "met": value < base,
                              "detail": f"{value:.3f} vs {base:.3f}"})
    lines.append("goals:")
    lines += [f"  {'MET   ' if g['met'] else 'MISSED'} {g['name']}: {g['detail']}" for g in goals]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
    return "\n".join(lines), {"settings": settings, "rows": summaries, "goals": goals,
                              "kv_bytes_per_token": kv_bytes_per_token}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("smollm2", "window-llama"), default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct (8K); window-llama: the tiny Llama trained here "
                             "for a 256-token window (default smollm2)")
    parser.add_argument("--factor", type=int, default=None,
                        help="document length in trained windows (default 4 for window-llama; 2 for smollm2, "
                             "whose 4x = 32K tokens takes about an hour per ReRoPE row on 2 cores)")
    parser.add_argument("--docs", type=int, default=1, help="documents per row (default 1)")
    parser.add_argument("--rows", default="plain-rope,vllm-yarn,rerope,leaky-rerope",
                        help="comma-separated rows to run (default: all four)")
    parser.add_argument("--work-dir", type=Path, default=None, help="logs go here (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write the result as JSON: to PATH, or after the table on stdout")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from ucm.serve.models import prepare
    from ucm.window.rope import RopeSpec

    model = prepare(args.model)
    config = AutoConfig.from_pretrained(model)
    factor = args.factor if args.factor is not None else (2 if args.model == "smollm2" else 4)
    if factor < 2:
        raise SystemExit(f"--factor: expected at least 2 (trained windows per document), got {factor}")
    rows_wanted = tuple(r for r in args.rows.split(",") if r)
    s = Settings(model=model, model_name=args.model, trained=int(config.max_position_embeddings), factor=factor,
                 docs=args.docs, rows=rows_wanted, work_dir=Path(args.work_dir or tempfile.mkdtemp(prefix="ucm-window-")),
                 keep=bool(args.keep), json=args.json)
    configs = row_configs(s, RopeSpec.from_hf_config(config).theta)
    unknown = [r for r in rows_wanted if r not in configs]
    if unknown:
        raise SystemExit(f"--rows: unknown row {unknown[0]!r}; accepted: {', '.join(configs)}")
    docs = documents(AutoTokenizer.from_pretrained(model), s.docs, s.length)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32
    try:
        rows = [run_row(s, name, *configs[name], docs) for name in rows_wanted]
    finally:
        if not s.keep:
            shutil.rmtree(s.work_dir, ignore_errors=True)
    text, document = report(s, rows, kv_bytes)
    print(text, flush=True)
    if s.json == "-":
        print(json.dumps(document, indent=2))
    elif s.json:
        Path(s.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(not r.error for r in rows) else 1
