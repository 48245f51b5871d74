"""`ucm bench blend`: cache blend on a RAG workload through real `vllm serve` processes.

Workload: a system prompt, then `passages` retrieved passages of 256-512 tokens of natural text
(Python's language reference, `ucm.bench.window.documents`), each ended by the separator and
cut to whole KV blocks (a chunk is a run of whole blocks), in a
different shuffled order for every prompt, then a question about one of them. Prompts are built from
token ids (passages tokenized alone), as a RAG application using blend does.

Two servers: a producer that stores the passages (each sent alone once: a chunk's stored KV is its
KV computed on its own) and the system prompt, and the measured consumer (loads, never saves, so
one method's request cannot leave prefix hits for the next). Methods, side by side per prompt:
  full-recompute  the consumer with a fresh cache_salt (nothing can hit)
  prefix-only     UCM prefix caching, blend off for the request (kv_transfer_params ucm_blend=false)
  naive-reuse     blend at ratio 0: stored chunk KV used as is, re-rotated
  blend-R         blend at recompute ratio R (kv_transfer_params ucm_blend_ratio)
TTFT: time to the first streamed token of a greedy answer of up to 32 tokens. Quality against full recompute:
exact match of the 32 greedy tokens, and the KL divergence KL(full || method) of the next-token
distributions over full recompute's answer (teacher-forced: the answer is appended to the prompt and
vLLM's prompt_logprobs read at its positions, which blend always computes), over the top-20 tokens of
full recompute (a token missing from the method's top 20 gets its 20th logprob: a lower bound).

Goals (issue 16): TTFT >= 2.5x better than full recompute at 0.15 with 4+ passages; blend at 0.15
closes >= 80% of the KL gap between naive reuse and full recompute and matches full recompute's 32
greedy tokens in >= 90% of prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ucm.bench.common import stream_completion
from ucm.serve.server import VllmServer, start_all, ucm_transfer_config

SEPARATOR = "\n\n# # #\n\n"
ANSWER_TOKENS = 32
TOP_K = 20
GOAL_TTFT = 2.5
GOAL_KL_CLOSED = 0.8
GOAL_EXACT = 0.9
SYSTEM = ("<|im_start|>system\nYou are a helpful assistant. Answer the question using only the passages "
          "below, which come from the Python language reference.<|im_end|>\n<|im_start|>user\n")


@dataclass
class Method:
    name: str
    ttft: list[float] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)
    topk: list[list[dict[int, float]]] = field(default_factory=list)  # per prompt, per answer position


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    passages: int


def build_prompts(tokenizer: Any, count: int, passages: int, seed: int) -> tuple[list[list[int]], list[int], list[Prompt]]:
    """(passage token ids, system prefix ids, prompts): `passages` per prompt, shuffled differently."""
    from ucm.bench.window import documents

    rng = random.Random(seed)
    pool_size = passages + 2
    docs = documents(tokenizer, pool_size, 512)
    sep = tokenizer.encode(SEPARATOR, add_special_tokens=False)
    # a chunk is a run of whole KV blocks (128 tokens on the CPU backend), separator included: passages
    # of 2-4 blocks (256-512 tokens), as an application using blend cuts them
    passage_ids = [d[: rng.choice((256, 384, 512)) - len(sep)] for d in docs]
    system = tokenizer.encode(SYSTEM, add_special_tokens=False) + sep
    prompts = []
    for _ in range(count):
        chosen = rng.sample(range(pool_size), passages)
        about = tokenizer.decode(passage_ids[rng.choice(chosen)][:12]).strip().replace("\n", " ")
        question = tokenizer.encode(
            f"Question: what does the passage that begins with \"{about}\" explain?<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )
        ids = list(system)
        for i in chosen:
            ids += passage_ids[i] + sep
        prompts.append(Prompt(ids + question, passages))
    return [p + sep for p in passage_ids], system, prompts


def stream_answer(url: str, ids: list[int], params: dict[str, Any]) -> tuple[float, list[int]]:
    """(TTFT in seconds, the greedy answer's token ids) of one streaming completion."""
    body = {"model": "model", "prompt": ids, "max_tokens": ANSWER_TOKENS, "temperature": 0,
            "return_token_ids": True, **params}
    started = time.perf_counter()
    ttft = math.nan
    tokens: list[int] = []
    for arrived, choice in stream_completion(url, body, 600):
        if math.isnan(ttft):
            ttft = arrived - started
        tokens += choice["token_ids"]
    return ttft, tokens


def answer_topk(url: str, ids: list[int], answer: list[int], params: dict[str, Any]) -> list[dict[int, float]]:
    """Top-20 next-token logprobs at each answer position, teacher-forced (prompt_logprobs)."""
    body = {"model": "model", "prompt": ids + answer, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": TOP_K, "return_token_ids": True, **params}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    entries = reply.json()["choices"][0]["prompt_logprobs"]
    # entry i is the distribution of token i given tokens < i: answer token j sits at len(ids) + j
    return [{int(t): float(v["logprob"]) for t, v in entries[len(ids) + j].items()} for j in range(len(answer))]


def kl(reference: dict[int, float], other: dict[int, float]) -> float:
    floor = min(other.values())
    return sum(math.exp(lp) * (lp - other.get(t, floor)) for t, lp in reference.items())


def method_params(name: str) -> dict[str, Any]:
    if name == "full-recompute":
        return {"cache_salt": uuid.uuid4().hex}
    if name == "prefix-only":
        return {"kv_transfer_params": {"ucm_blend": False}}
    ratio = 0.0 if name == "naive-reuse" else float(name.removeprefix("blend-"))
    return {"kv_transfer_params": {"ucm_blend_ratio": ratio}}


def summarize(methods: list[Method]) -> tuple[str, dict[str, Any]]:
    full = methods[0]
    rows: list[dict[str, Any]] = []
    for m in methods:
        exact = [a == b for a, b in zip(m.answers, full.answers, strict=True)]
        kls = [statistics.fmean(kl(r, o) for r, o in zip(ref, mine, strict=True))
               for ref, mine in zip(full.topk, m.topk, strict=True)]
        ttft = statistics.median(m.ttft)
        rows.append({"method": m.name, "ttft_p50_s": ttft, "speedup": statistics.median(full.ttft) / ttft,
                     "exact_match": sum(exact) / len(exact), "kl_mean": statistics.fmean(kls)})
    by_name = {r["method"]: r for r in rows}
    lines = [f"{'method':<16}{'TTFT p50 s':>12}{'vs full':>9}{'exact 32':>10}{'KL vs full':>12}"]
    lines += [f"{r['method']:<16}{r['ttft_p50_s']:>12.3f}{r['speedup']:>8.2f}x{r['exact_match']:>10.0%}"
              f"{r['kl_mean']:>12.4f}" for r in rows]
    goals: list[dict[str, Any]] = []
    if "blend-0.15" in by_name and "naive-reuse" in by_name:
        b, naive = by_name["blend-0.15"], by_name["naive-reuse"]
        speedup, exact_share = float(b["speedup"]), float(b["exact_match"])
        closed = 1 - float(b["kl_mean"]) / float(naive["kl_mean"]) if naive["kl_mean"] > 0 else math.nan
        goals = [
            {"goal": f"TTFT at 0.15 >= {GOAL_TTFT}x better than full recompute", "value": speedup,
             "met": speedup >= GOAL_TTFT},
            {"goal": f"blend 0.15 closes >= {GOAL_KL_CLOSED:.0%} of naive reuse's KL gap", "value": closed,
             "met": closed >= GOAL_KL_CLOSED},
            {"goal": f"blend 0.15 matches full recompute's 32 greedy tokens in >= {GOAL_EXACT:.0%} of prompts",
             "value": exact_share, "met": exact_share >= GOAL_EXACT},
        ]
        lines += [""] + [f"goal: {g['goal']}: {g['value']:.2f} -> {'met' if g['met'] else 'NOT met'}" for g in goals]
    return "\n".join(lines), {"methods": rows, "goals": goals}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=10, help="RAG prompts per method (default 10)")
    parser.add_argument("--passages", type=int, default=4, help="retrieved passages per prompt (default 4)")
    parser.add_argument("--ratios", default="0.05,0.15,0.30", help="blend recompute ratios (default 0.05,0.15,0.30)")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads of the measured server (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="store and logs (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write the result as JSON: to PATH, or after the table on stdout")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ucm.serve.models import prepare

    if args.prompts < 1 or args.passages < 2:
        raise SystemExit("--prompts: at least 1; --passages: at least 2")
    ratios = [float(r) for r in args.ratios.split(",") if r]
    model = prepare("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model)
    chunks, system, prompts = build_prompts(tokenizer, args.prompts, args.passages, args.seed)
    sep = tokenizer.encode(SEPARATOR, add_special_tokens=False)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ucm-blend-"))
    longest = max(len(p.ids) for p in prompts) + ANSWER_TOKENS + 8
    blend = {"ucm_blend_config": {"separator_ids": sep}}
    common = {"model": model, "log_dir": work / "logs", "max_model_len": longest, "kv_cache_gib": 2,
              "extra_args": ["--max-num-batched-tokens", str(longest), "--max-num-seqs", "1"]}
    producer = VllmServer(name="producer", cpu_threads=1, **common,  # type: ignore[arg-type]
                          kv_transfer_config=ucm_transfer_config("kv_producer", work / "store", "smollm2", **blend))
    consumer = VllmServer(name="consumer", cpu_threads=args.threads, **common,  # type: ignore[arg-type]
                          kv_transfer_config=ucm_transfer_config("kv_consumer", work / "store", "smollm2", **blend))
    names = ["full-recompute", "prefix-only", "naive-reuse"] + [f"blend-{r:.2f}" for r in ratios]
    methods = [Method(n) for n in names]
    try:
        print("starting a producer and a consumer server ...", file=sys.stderr, flush=True)
        start_all([producer, consumer])
        for ids in [system, *chunks]:  # store the system prompt and every passage, each on its own
            stream_answer(producer.url, ids, {"max_tokens": 1})
        stream_answer(consumer.url, prompts[0].ids, method_params("full-recompute"))  # warm-up
        for i, prompt in enumerate(prompts):
            for m in methods:
                params = method_params(m.name)
                ttft, answer = stream_answer(consumer.url, prompt.ids, params)
                m.ttft.append(ttft)
                m.answers.append(answer)
            for m in methods:
                m.topk.append(answer_topk(consumer.url, prompt.ids, methods[0].answers[-1], method_params(m.name)))
            print(f"prompt {i + 1}/{len(prompts)} ({len(prompt.ids)} tokens): "
                  + ", ".join(f"{m.name} {m.ttft[-1]:.2f}s" for m in methods), file=sys.stderr, flush=True)
        metrics = consumer.metrics()
    except Exception:
        print(consumer.log_tail(60), file=sys.stderr)
        raise
    finally:
        producer.stop()
        consumer.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text, document = summarize(methods)
    reused = metrics.get("vllm:ucm_blend_reused_tokens_total", 0.0)
    recomputed = metrics.get("vllm:ucm_blend_recomputed_tokens_total", 0.0)
    header = (f"ucm bench blend: SmolLM2-135M-Instruct float32, {len(prompts)} prompts of {args.passages} passages "
              f"({min(len(p.ids) for p in prompts)}-{max(len(p.ids) for p in prompts)} tokens), "
              f"{args.threads} threads; consumer counters: {reused:.0f} tokens reused, {recomputed:.0f} recomputed")
    print(header + "\n" + text, flush=True)
    document["settings"] = {"prompts": len(prompts), "passages": args.passages, "threads": args.threads,
                            "seed": args.seed}
    if args.json == "-":
        print(json.dumps(document, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0
