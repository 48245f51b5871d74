"""`ucm bench sparse --serving`, admission part: the longest prompt a fixed KV pool serves, dense and
with sparse offload, and the loss that costs, through real `vllm serve` processes.

Rows, one server at a time, the pool fixed with `--num-gpu-blocks-override` (`--admission-pool`
blocks of 128 tokens) and prompts prefilled in 256-token chunks:
  dense-pool    vLLM's own attention on the pool: the longest `max_model_len` it starts with is
                what the pool holds (vLLM checks at start-up), so that is its longest prompt; a
                prompt of the sparse row's length is refused
  sparse-pool   UCM block retrieval with offload on the same pool, `max_model_len` the model's
                trained length: earlier chunks' blocks leave for the store while later chunks
                prefill, decoding holds its windows and slots
  dense-ref     vLLM's own attention with a pool that holds everything: the loss baseline
Each served prompt is natural text (the language reference) read with `prompt_logprobs`, so the
loss per token is the engine's own; sparse-pool's loss differs from dense-ref's only in chunks
after its first offload (their attention is sparse), reported over the prompt's second half.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ucm.serve.server import VllmServer, ucm_transfer_config

BLOCK = 128  # the CPU backend's KV block size
CHUNK = 256  # prefill chunk (--max-num-batched-tokens)
# the scheduler's line when a request's offload ends (`ucm.sparse.vllm_offload.OFFLOAD_ENDED_LOG`):
# request, blocks at its last step, at most, context blocks
HELD = re.compile(r"request (\S+): offload ended; it held (\d+) GPU blocks at its last step \(at most (\d+) after "
                  r"its first offload\) for a context of (\d+) blocks")


@dataclass
class AdmissionRow:
    name: str
    max_model_len: int
    pool: int | None  # blocks, or None for the server's default KV memory
    sparse: dict[str, Any] | None
    served: dict[int, float] = field(default_factory=dict)  # prompt tokens -> mean NLL per token, second half
    refused: dict[int, str] = field(default_factory=dict)  # prompt tokens -> the server's error
    seconds: dict[int, float] = field(default_factory=dict)
    held: list[tuple[int, int]] = field(default_factory=list)  # (peak blocks, context blocks) per request
    error: str = ""


def prompt_nll(url: str, ids: list[int]) -> tuple[list[float] | None, str]:
    """(NLL of positions 1..N-1, "") or (None, the refusal's text) for one prompt."""
    reply = httpx.post(url + "/v1/completions", timeout=3600, json={
        "model": "model", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    if reply.status_code == 400:
        return None, reply.text[:200]
    reply.raise_for_status()
    entries = reply.json()["choices"][0]["prompt_logprobs"][1:]
    return [-float(next(iter(e.values()))["logprob"]) for e in entries], ""


def run_admission_row(row: AdmissionRow, args: argparse.Namespace, model: Path, work: Path,
                      prompts: list[list[int]]) -> None:
    extra_args = ["--max-num-batched-tokens", str(CHUNK), "--enable-chunked-prefill", "--max-num-seqs", "1"]
    if row.pool is not None:
        extra_args += ["--num-gpu-blocks-override", str(row.pool)]
    extra = {"ucm_sparse_config": row.sparse} if row.sparse is not None else {}
    server = VllmServer(
        model=model, log_dir=work / "logs", name=row.name, max_model_len=row.max_model_len,
        kv_cache_gib=args.kv_cache_gib, cpu_threads=args.threads, extra_args=extra_args,
        kv_transfer_config=ucm_transfer_config("kv_both", work / f"store-{row.name}", args.model, **extra),
    )
    print(f"{row.name}: starting (max_model_len {row.max_model_len}, pool {row.pool or 'default'}) ...",
          file=sys.stderr, flush=True)
    try:
        server.start().wait_ready()
        for ids in prompts:
            started = time.perf_counter()
            nll, refusal = prompt_nll(server.url, ids)
            if nll is None:
                row.refused[len(ids)] = refusal
                continue
            row.seconds[len(ids)] = time.perf_counter() - started
            half = nll[len(nll) // 2 :]
            row.served[len(ids)] = sum(half) / len(half)
            print(f"{row.name}: {len(ids)} tokens in {row.seconds[len(ids)]:.0f} s", file=sys.stderr, flush=True)
        row.held = [(int(m[3]), int(m[4])) for m in HELD.finditer(server.log_path.read_text(errors="replace"))]
    except Exception as exc:  # a failed row is reported, the other rows still run
        row.error = f"{type(exc).__name__}: {exc}"
        print(f"FAILED {row.name}: {row.error}\n{server.log_tail()}", file=sys.stderr, flush=True)
    finally:
        server.stop()


def measure(args: argparse.Namespace, model: Path, work: Path, text: list[int], trained: int) -> tuple[str, dict[str, Any]]:
    pool = args.admission_pool
    dense_len = (pool - 1) * BLOCK  # vLLM's start-up check: one request must fit the usable blocks
    long_len = trained
    short = text[: dense_len - 1]  # within max_model_len with the one generated token
    long = text[: long_len - 1]
    sparse = {"name": "block_retrieval", "keep_ratio": args.keep[0], "init_blocks": 1, "local_blocks": 2,
              "min_blocks": 4, "offload": True}
    rows = [
        AdmissionRow("dense-pool", dense_len, pool, None),
        AdmissionRow("sparse-pool", long_len, pool, sparse),
        AdmissionRow("dense-ref", long_len, None, None),
    ]
    for row in rows:
        run_admission_row(row, args, model, work, [short, long] if row.name != "dense-ref" else [long])
    ref = rows[2].served.get(len(long), math.nan)
    lines = [f"admission on a pool of {pool} blocks ({pool * BLOCK} tokens), prefill chunks of {CHUNK}, "
             f"sparse keep {args.keep[0]:g}; loss = mean NLL over each prompt's second half",
             f"{'row':<13}{'longest served':>15}{'refused':>9}{'loss':>8}{'vs dense-ref':>13}{'peak/context blocks':>21}"]
    result: dict[str, Any] = {"pool_blocks": pool, "chunk": CHUNK, "keep_ratio": args.keep[0], "rows": {}}
    for row in rows:
        longest = max(row.served, default=0)
        loss = row.served.get(longest, math.nan)
        peak = max((p for p, _ in row.held), default=0)
        context = max((c for _, c in row.held), default=0)
        result["rows"][row.name] = {
            "max_model_len": row.max_model_len, "pool_blocks": row.pool, "longest_served": longest,
            "refused": sorted(row.refused), "loss_second_half": loss, "seconds": row.seconds,
            "peak_blocks": peak or None, "context_blocks": context or None, "error": row.error,
        }
        delta = (loss / ref - 1) if longest == len(long) and ref == ref else math.nan
        lines.append(f"{row.name:<13}{longest:>15}{len(row.refused):>9}{loss:>8.3f}{delta:>+13.1%}"
                     f"{f'{peak}/{context}' if peak else '-':>21}" + (f"  FAILED: {row.error}" if row.error else ""))
    dense_longest = result["rows"]["dense-pool"]["longest_served"]
    sparse_longest = result["rows"]["sparse-pool"]["longest_served"]
    result["context_ratio"] = sparse_longest / dense_longest if dense_longest else math.nan
    lines.append(f"longest prompt on the same pool: sparse {sparse_longest} / dense {dense_longest} tokens = "
                 f"{result['context_ratio']:.2f}x (goal >= 3x)")
    return "\n".join(lines), result
