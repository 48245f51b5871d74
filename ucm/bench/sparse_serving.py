"""`ucm bench sparse --serving`: sparse attention with offload in real `vllm serve` processes.

What it measures, on a trained model (SmolLM2-135M-Instruct by default) and long natural text that
ships with Python (the language reference's prose, as `ucm bench window` uses), side by side in one
run, one server per row at a time (same threads, same KV memory):
  dense         vLLM's own attention, every block resident
  sparse-<k>    UCM block retrieval at keep ratio k with offload: a decoding request's blocks outside
                the windows leave vLLM's block pool once stored, selected ones come back into slots
Per row: greedy continuations of `--docs` documents of `--tokens` tokens (`--decode` tokens each,
top-20 log-probabilities per step), compared with dense: tokens equal up to the first divergence,
tokens equal position by position, and the KL divergence of the top-20 next-token distributions at
the steps before the first divergence (same prefix, so the same question); needle retrieval (a
number planted at several depths of the text, asked for at the end, through the chat template);
decode tokens per second (streamed: first to last token); and the KV blocks a request holds in
vLLM's pool at its last step (the scheduler's log line when its offload ends) against the blocks
of its context, which dense attention holds.

Then the admission rows (`ucm.bench.sparse_admission`): the longest prompt a fixed KV pool serves,
dense and with offload, and the loss that costs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ucm.bench import sparse_admission
from ucm.bench.blend import kl
from ucm.bench.common import stream_completion
from ucm.bench.sparse_admission import BLOCK, HELD
from ucm.bench.window import documents
from ucm.serve.server import VllmServer, ucm_transfer_config

NEEDLE = "The secret number of the archive is {number}."
QUESTION = "What is the secret number of the archive? Answer with the number only."



@dataclass
class Row:
    name: str
    sparse: dict[str, Any] | None
    continuations: list[dict[str, Any]] = field(default_factory=list)  # per doc: tokens, top-20 per step
    decode_tokens_per_s: list[float] = field(default_factory=list)
    needles: list[dict[str, Any]] = field(default_factory=list)
    held_blocks: list[int] = field(default_factory=list)  # per request that offloaded: blocks at its last step
    counters: dict[str, float] = field(default_factory=dict)
    error: str = ""


def stream(url: str, body: dict[str, Any]) -> tuple[list[int], list[dict[str, float]], float]:
    """(token ids, top log-probabilities per step, decode tokens/s from the first token to the last)."""
    tokens: list[int] = []
    top: list[dict[str, float]] = []
    stamps: list[float] = []
    for arrived, choice in stream_completion(url, body, 1800):
        stamps.append(arrived)
        tokens += choice["token_ids"]
        top += (choice.get("logprobs") or {}).get("top_logprobs") or []
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else math.nan
    return tokens, top, rate


def needle_prompts(tokenizer: Any, text: list[int], depths: list[float], tokens: int) -> list[tuple[float, str, list[int]]]:
    """(depth, number, prompt ids): the needle sentence inside `tokens` of text, then the question."""
    out = []
    for i, depth in enumerate(depths):
        number = str(4000 + 1237 * (i + 1) % 5000)
        needle = tokenizer.encode(" " + NEEDLE.format(number=number) + " ", add_special_tokens=False)
        body = text[: tokens - len(needle) - 64]
        at = int(len(body) * depth)
        haystack = tokenizer.decode(body[:at] + needle + body[at:])
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": haystack + "\n\n" + QUESTION}], add_generation_prompt=True, tokenize=False)
        out.append((depth, number, tokenizer.encode(ids, add_special_tokens=False)))
    return out


def run_row(row: Row, args: argparse.Namespace, model: Path, work: Path, docs: list[list[int]],
            needles: list[tuple[float, str, list[int]]]) -> None:
    extra = {"ucm_sparse_config": row.sparse} if row.sparse is not None else {}
    server = VllmServer(
        model=model, log_dir=work / "logs", name=row.name, max_model_len=args.serving_tokens + args.serving_decode + 256,
        kv_cache_gib=args.kv_cache_gib, cpu_threads=args.threads, extra_args=["--max-num-seqs", "1"],
        kv_transfer_config=ucm_transfer_config("kv_both", work / f"store-{row.name}", args.model, **extra),
    )
    print(f"{row.name}: starting ...", file=sys.stderr, flush=True)
    try:
        server.start().wait_ready()
        for i, doc in enumerate(docs):
            tokens, top, rate = stream(server.url, {"model": "model", "prompt": doc, "max_tokens": args.serving_decode,
                                                    "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                                                    "logprobs": 20})
            row.continuations.append({"tokens": tokens, "top": top})
            row.decode_tokens_per_s.append(rate)
            print(f"{row.name}: document {i + 1}/{len(docs)}, {rate:.1f} decode tokens/s", file=sys.stderr, flush=True)
        for depth, number, ids in needles:
            tokens, _, _ = stream(server.url, {"model": "model", "prompt": ids, "max_tokens": 32, "temperature": 0,
                                               "return_token_ids": True})
            answer = server_tokenizer(model).decode(tokens)
            row.needles.append({"depth": depth, "number": number, "answer": answer, "found": number in answer})
        row.counters = {k.removeprefix("vllm:ucm_").removesuffix("_total"): v for k, v in server.metrics().items()
                        if k.startswith("vllm:ucm_sparse_") and k.endswith("_total")}
        row.held_blocks = [int(m[2]) for m in HELD.finditer(server.log_path.read_text(errors="replace"))]
    except Exception as exc:  # a failed row is reported, the other rows still run
        row.error = f"{type(exc).__name__}: {exc}"
        print(f"FAILED {row.name}: {row.error}\n{server.log_tail()}", file=sys.stderr, flush=True)
    finally:
        server.stop()


_TOKENIZERS: dict[Path, Any] = {}


def server_tokenizer(model: Path) -> Any:
    if model not in _TOKENIZERS:
        from transformers import AutoTokenizer  # function-level: only the serving bench needs it

        _TOKENIZERS[model] = AutoTokenizer.from_pretrained(model)
    return _TOKENIZERS[model]


def compare(row: Row, dense: Row) -> dict[str, Any]:
    """Quality of `row` against dense over the same documents."""
    prefix, equal, kls, steps = [], 0, [], 0
    for mine, ref in zip(row.continuations, dense.continuations, strict=True):
        a, b = mine["tokens"], ref["tokens"]
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n)
        equal += sum(x == y for x, y in zip(a, b, strict=False))
        steps += len(b)
        kls += [kl(r, m) for r, m in zip(ref["top"][: n + 1], mine["top"][: n + 1], strict=False)]
    return {
        "tokens_equal_until_first_divergence": prefix,
        "token_agreement": equal / steps if steps else math.nan,
        "kl_top20_same_prefix": sum(kls) / len(kls) if kls else math.nan,
        "needles_found": sum(n["found"] for n in row.needles),
    }


def report(args: argparse.Namespace, rows: list[Row]) -> tuple[str, dict[str, Any]]:
    dense = rows[0]
    dense_blocks = math.ceil((args.serving_tokens + args.serving_decode) / BLOCK)
    lines = [f"ucm bench sparse --serving: {args.model}, {args.docs} documents of {args.serving_tokens} tokens, "
             f"{args.serving_decode} decoded tokens each, {len(args.needle_depths)} needles; {args.threads} threads",
             f"{'row':<14}{'decode tok/s':>13}{'agree':>8}{'prefix':>16}{'KL top20':>10}{'needles':>9}{'KV blocks':>11}"]
    result: dict[str, Any] = {"model": args.model, "tokens": args.serving_tokens, "decode": args.serving_decode, "rows": {}}
    for row in rows:
        rate = sum(row.decode_tokens_per_s) / len(row.decode_tokens_per_s) if row.decode_tokens_per_s else math.nan
        quality = compare(row, dense) if not row.error and not dense.error else {}
        held = max(row.held_blocks) if row.held_blocks else dense_blocks
        result["rows"][row.name] = {
            "sparse": row.sparse, "error": row.error, "decode_tokens_per_s": rate, "kv_blocks_held": held,
            "kv_blocks_dense": dense_blocks, "needles": row.needles, "counters": row.counters, **quality,
        }
        found = f"{quality.get('needles_found', 0)}/{len(row.needles)}"
        lines.append(f"{row.name:<14}{rate:>13.2f}{quality.get('token_agreement', math.nan):>8.3f}"
                     f"{quality.get('tokens_equal_until_first_divergence', '')!s:>16}"
                     f"{quality.get('kl_top20_same_prefix', math.nan):>10.4f}{found:>9}{held:>6}/{dense_blocks:<4}"
                     + (f"  FAILED: {row.error}" if row.error else ""))
    return "\n".join(lines), result


def main(args: argparse.Namespace) -> int:
    from ucm.serve.models import prepare  # function-level: builds the model directory on first use

    model = prepare(args.model)
    tokenizer = server_tokenizer(model)
    texts = documents(tokenizer, args.docs + 1, args.serving_tokens)
    docs, haystack = texts[: args.docs], texts[args.docs]
    needles = needle_prompts(tokenizer, haystack, args.needle_depths, args.serving_tokens)
    work = Path(tempfile.mkdtemp(prefix="ucm-bench-sparse-serving-"))
    rows = [Row("dense", None)] + [
        Row(f"sparse-{k:g}", {"name": "block_retrieval", "keep_ratio": k, "init_blocks": 1, "local_blocks": 2,
                              "min_blocks": 4, "offload": True})
        for k in args.keep
    ]
    try:
        for row in rows:
            run_row(row, args, model, work, docs, needles)
        table, result = report(args, rows)
        if args.admission_pool:
            trained = int(json.loads((model / "config.json").read_text())["max_position_embeddings"])
            text = documents(tokenizer, 1, trained)[0]
            admission_table, result["admission"] = sparse_admission.measure(args, model, work, text, trained)
            table += "\n\n" + admission_table
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.json:
        print(table)
    print(json.dumps(result, sort_keys=True, default=str))
    failed = any(r.error for r in rows) or any(r["error"] for r in result.get("admission", {}).get("rows", {}).values())
    return 1 if failed else 0


def register(parser: argparse.ArgumentParser) -> None:
    """Options of the serving mode (`ucm bench sparse --serving ...`)."""
    group = parser.add_argument_group("serving mode (--serving)")
    group.add_argument("--serving", action="store_true", help="measure through real vllm serve processes")
    group.add_argument("--model", default="smollm2", help="a `ucm model prepare` name")
    group.add_argument("--serving-tokens", dest="serving_tokens", type=int, default=4096, help="prompt tokens")
    group.add_argument("--serving-decode", type=int, default=64, help="greedy tokens decoded per document")
    group.add_argument("--docs", type=int, default=2)
    group.add_argument("--keep", type=float, nargs="+", default=[0.25])
    group.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    group.add_argument("--kv-cache-gib", type=int, default=2)
    group.add_argument("--admission-pool", type=int, default=22,
                       help="KV blocks of the fixed pool the admission rows share (0 skips them)")
