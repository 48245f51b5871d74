"""`ucm bench sparse`: accuracy, KV bytes read and time of block retrieval vs dense attention.

Every number comes with its same-run dense baseline: output error (cosine similarity and max abs
error of the attention output), recall of the exact top-k blocks by true attention mass, K/V bytes
read per decode step (summaries included on re-selection steps) and attention time, at keep ratios
10%, 25%, 50%, on (1) real Q/K/V of a tiny causal byte-level transformer trained here (`tiny_lm`:
causal decode replay over 2048-token windows of held-out text, every layer and head) — the model
the accuracy goal is judged on, since decode attention is causal; (2) real Q/K/V of the trained
encoder all-MiniLM-L6-v2 replayed causally over 512-token windows (real statistics, but a
bidirectional model); (3) planted contexts of 32K-128K tokens. Each trained-model run is also
replayed through the vLLM-path hook (per-row selection, `ucm.bench.sparse_paged`). A last run offloads a
planted context to a real FileStore and reports bytes fetched per step. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ucm.bench import sparse_serving
from ucm.bench.sparse_data import PlantedContext, minilm_qkv, planted_context, tiny_lm_qkv
from ucm.bench.sparse_paged import bench_trained_paged
from ucm.bench.sparse_tally import KEEP_RATIOS, Tally, exact_topk_recall
from ucm.bench.sparse_vllm_offload import bench_vllm_offload_windows
from ucm.bench.tiny_lm import TinyLMConfig
from ucm.sparse import retrieval_math as rm
from ucm.sparse.block_retrieval import BlockRetrievalConfig, DecodeLayer
from ucm.sparse.offload import ResidentBlocks
from ucm.store import FileStore

GOAL_COSINE, GOAL_BYTES_REDUCTION = 0.99, 3.0


def run_decode(
    config: BlockRetrievalConfig,
    tally: Tally,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    *,
    prefix: int,
    block_size: int,
    grow: bool,
    needles: torch.Tensor | None = None,
) -> None:
    """Decode replay: the layer holds `prefix` tokens, then each step (optionally appending that
    step's own token first, as decode does) attends with the next query; dense runs on the same K/V."""
    n_kv, head_dim = keys.shape[1], keys.shape[2]
    scale = head_dim**-0.5
    layer = DecodeLayer(
        config, num_kv_heads=n_kv, head_dim=head_dim, block_size=block_size, max_tokens=keys.shape[0], scale=scale
    )
    layer.append(keys[:prefix], values[:prefix])
    for step, query in enumerate(queries):
        if grow:
            t = prefix + step
            layer.append(keys[t : t + 1], values[t : t + 1])
        n = layer.num_tokens
        t0 = time.perf_counter()
        out, report = layer.step(query)
        t1 = time.perf_counter()
        dense = rm.dense_decode_attention(query, layer.keys, layer.values, n, scale)
        t2 = time.perf_counter()
        tally.sparse_s += t1 - t0
        tally.dense_s += t2 - t1
        tally.add(out, dense, query.shape[0])
        tally.sparse_bytes += report.kv_bytes + report.summary_bytes
        tally.dense_bytes += 2 * n * n_kv * head_dim * layer.keys.element_size()
        tally.steps += 1
        mass = rm.block_attention_mass(query, layer.keys[:, : layer.num_blocks], n, scale)
        tally.recalls.append(exact_topk_recall(report.selection, mass))
        tally.add_oracle(config, query, layer.keys, layer.values, n, mass, report.selection.shape[1], dense, scale)
        if needles is not None:
            sel = report.selection
            found = [len(set(sel[h].tolist()) & set(needles[h].tolist())) for h in range(sel.shape[0])]
            tally.needle_recalls.append(sum(found) / needles.numel())


def bench_trained(
    args: argparse.Namespace, windows: list[Any], block_size: int, decode_steps: int,
    ratios: tuple[float, ...] = KEEP_RATIOS,
) -> dict[str, Any]:
    """Causal decode replay on real activations: per window and layer, the last `decode_steps`
    positions are decoded one by one over all earlier tokens of that window."""
    out: dict[str, Any] = {}
    for ratio in ratios:
        config = BlockRetrievalConfig.from_dict(
            {"keep_ratio": ratio, "init_blocks": 1, "local_blocks": 2, "retrieval_stride": args.stride,
             "summary": args.summary, "min_blocks": 4}
        )
        tally = Tally()
        for layers in windows:
            for lq in layers:
                t = lq.key.shape[0]
                prefix = t - decode_steps
                run_decode(config, tally, lq.key, lq.value, lq.query[prefix:], prefix=prefix,
                           block_size=block_size, grow=True)
        out[f"keep_{ratio}"] = tally.result()
    return out


def bench_planted(args: argparse.Namespace, ctx: PlantedContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ratio in KEEP_RATIOS:
        config = BlockRetrievalConfig.from_dict(
            {"keep_ratio": ratio, "retrieval_stride": args.stride, "summary": args.summary}
        )
        tally = Tally()
        run_decode(config, tally, ctx.keys, ctx.values, ctx.queries, prefix=ctx.keys.shape[0],
                   block_size=args.block_size, grow=False, needles=ctx.needle_blocks)
        out[f"keep_{ratio}"] = tally.result()
    return out


def bench_offload(args: argparse.Namespace, ctx: PlantedContext, store_dir: Path) -> dict[str, Any]:
    """The planted context lives only in a FileStore; a bounded resident pool fetches the selection.
    Run twice over the same store — with prefetch (runners-up + trending) and without — so the
    bytes fetched on the critical path have a same-run baseline."""
    bs = args.block_size
    nb = ctx.keys.shape[0] // bs
    n_kv, head_dim = ctx.keys.shape[1], ctx.keys.shape[2]
    hashes = [os.urandom(16) for _ in range(nb)]
    store = FileStore(store_dir, salt=b"\x5a" * 16, io_threads=4)
    result: dict[str, Any] = {"tokens": ctx.keys.shape[0], "total_head_blocks": nb * n_kv,
                              "context_kv_bytes": 2 * ctx.keys.numel() * ctx.keys.element_size()}
    try:
        def pool(prefetch: int) -> tuple[BlockRetrievalConfig, ResidentBlocks]:
            config = BlockRetrievalConfig.from_dict(
                {"keep_ratio": 0.25, "retrieval_stride": args.stride, "prefetch_blocks": prefetch}
            )
            keep = rm.num_blocks_to_keep(nb, 0.25, config.init_blocks, config.local_blocks)
            capacity = n_kv * (keep + 2 * max(prefetch, 4))
            return config, ResidentBlocks(store, hashes, layer_index=0, num_kv_heads=n_kv, block_size=bs,
                                          head_dim=head_dim, capacity=capacity)

        _, writer = pool(0)
        kb, _ = rm.to_block_major(ctx.keys, bs)
        vb, _ = rm.to_block_major(ctx.values, bs)
        t0 = time.perf_counter()
        tasks = [writer.offload(b, torch.stack([kb[:, b], vb[:, b]])) for b in range(nb)]
        if not all(all(t.wait()) for t in tasks):
            raise RuntimeError("offload bench: a block could not be written to the store")
        result["dump_s"] = round(time.perf_counter() - t0, 2)
        for label, prefetch in (("prefetch", 4), ("no_prefetch", 0)):
            config, resident = pool(prefetch)
            layer = DecodeLayer(config, num_kv_heads=n_kv, head_dim=head_dim, block_size=bs,
                                max_tokens=ctx.keys.shape[0], scale=head_dim**-0.5, offload=resident)
            layer.append(ctx.keys, ctx.values)  # summaries only; attention reads the resident pool
            fetched, steps_s = [], []
            for query in ctx.queries:
                t1 = time.perf_counter()
                _, report = layer.step(query)
                steps_s.append(time.perf_counter() - t1)
                fetched.append(report.fetched_bytes)
            resident.drain()
            s = resident.stats
            result[label] = {
                "resident_slots": resident.capacity, "resident_bytes": resident.capacity * resident.layout.nbytes,
                "fetched_bytes_per_step": fetched, "fetched_bytes_after_first_step": sum(fetched[1:]),
                "prefetched_bytes": s.prefetched_bytes, "prefetch_hits": s.prefetch_hits,
                "evictions": s.evictions, "step_ms_mean": round(1e3 * statistics.fmean(steps_s), 2),
            }
        return result
    finally:
        # FileStore pre-creates its shard directories on a background thread that close() does not
        # join; wait for it so the temporary directory can be removed
        store.index_ready.wait(timeout=60)
        store.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    result: dict[str, Any] = {"config": {"stride": args.stride, "summary": args.summary, "init_blocks": 1,
                                         "local_blocks": 2, "block_size": args.block_size,
                                         "minilm_block_size": args.minilm_block_size}}
    if not args.skip_tiny_lm:
        # the first seed is the model reported as `tiny_lm`; every further seed is another training
        # run of the same recipe, so that a result is not one lucky (or tuned-on) model
        result["tiny_lm_seeds"] = {}
        for i, seed in enumerate(args.lm_seeds):
            t0 = time.perf_counter()
            windows, log = tiny_lm_qkv(num_windows=args.lm_windows, config=TinyLMConfig(seed=seed))
            run_ = {"model": {**log, "load_or_train_s": round(time.perf_counter() - t0, 1)},
                    "per_head": bench_trained(args, windows, args.lm_block_size, args.lm_decode_steps),
                    "vllm_path": bench_trained_paged(args, windows, args.lm_block_size, args.lm_decode_steps)}
            if i == 0:
                result["tiny_lm_model"], result["tiny_lm"], result["tiny_lm_vllm_path"] = (
                    run_["model"], run_["per_head"], run_["vllm_path"])
                # offload inside vLLM (worker half): GPU blocks held and store reads per step
                offload_config = BlockRetrievalConfig.from_dict(
                    {"keep_ratio": 0.25, "init_blocks": 1, "local_blocks": 2, "retrieval_stride": args.stride,
                     "summary": args.summary, "min_blocks": 4, "offload": True,
                     "host_cache_blocks": args.offload_host_blocks})
                result["tiny_lm_vllm_offload"] = bench_vllm_offload_windows(
                    offload_config, windows, args.lm_block_size, args.lm_decode_steps)
            else:
                result["tiny_lm_seeds"][str(seed)] = run_
    if not args.skip_minilm:
        t0 = time.perf_counter()
        windows = minilm_qkv(num_windows=args.windows)
        result["minilm_load_s"] = round(time.perf_counter() - t0, 1)
        result["minilm"] = bench_trained(args, windows, args.minilm_block_size, args.decode_steps)
        result["minilm_vllm_path"] = bench_trained_paged(args, windows, args.minilm_block_size, args.decode_steps)
    result["planted"] = {}
    result["graded"] = {}
    for tokens in args.tokens:
        ctx = planted_context(tokens, num_kv_heads=args.kv_heads, group=args.group, block_size=args.block_size,
                              steps=args.planted_steps)
        result["planted"][str(tokens)] = bench_planted(args, ctx)
        if args.graded_needles:
            ctx = planted_context(tokens, num_kv_heads=args.kv_heads, group=args.group, block_size=args.block_size,
                                  steps=args.planted_steps, num_needles=args.graded_needles, strength=(0.5, 3.0),
                                  seed=2)
            result["graded"][str(tokens)] = bench_planted(args, ctx)
    if args.offload_tokens:
        ctx = planted_context(args.offload_tokens, num_kv_heads=args.kv_heads, group=args.group,
                              block_size=args.block_size, steps=args.planted_steps, seed=1)
        with tempfile.TemporaryDirectory(prefix="ucm-sparse-bench-") as tmp:
            result["offload"] = bench_offload(args, ctx, Path(tmp) / "store")
    goal: dict[str, Any] = {}
    if "tiny_lm" in result:
        # judged on the causal model: the goal is about decode attention, which is causal; MiniLM
        # is a bidirectional encoder replayed causally (reported alongside, not judged)
        at25 = result["tiny_lm"]["keep_0.25"]
        goal = {"judged_on": "tiny_lm, every seed", "why": "decode attention is causal: tiny_lm is a causal decoder "
                "trained here (each seed a separate training run); all-MiniLM-L6-v2 is a bidirectional encoder, "
                "reported alongside",
                "cosine_mean_at_25": at25["cosine_mean"], "oracle_cosine_mean_at_25": at25["oracle_cosine_mean"],
                "vllm_path_cosine_mean_at_25": result["tiny_lm_vllm_path"]["keep_0.25"]["cosine_mean"],
                "bytes_reduction_at_25": at25["bytes_reduction"]}
        others = {seed: r["per_head"]["keep_0.25"] for seed, r in result["tiny_lm_seeds"].items()}
        goal["other_seeds_cosine_mean_at_25"] = {seed: v["cosine_mean"] for seed, v in others.items()}
        goal["other_seeds_oracle_cosine_mean_at_25"] = {seed: v["oracle_cosine_mean"] for seed, v in others.items()}
        goal["met"] = all(v["cosine_mean"] >= GOAL_COSINE and v["bytes_reduction"] >= GOAL_BYTES_REDUCTION
                          for v in [at25, *others.values()])  # on every seed
        # the same goal for what runs inside vLLM (one selection per request row)
        vllm = [result["tiny_lm_vllm_path"]["keep_0.25"],
                *(r["vllm_path"]["keep_0.25"] for r in result["tiny_lm_seeds"].values())]
        goal["vllm_path_cosine_mean_at_25_every_seed"] = [v["cosine_mean"] for v in vllm]
        goal["vllm_path_met"] = all(v["cosine_mean"] >= GOAL_COSINE and v["bytes_reduction"] >= GOAL_BYTES_REDUCTION
                                    for v in vllm)
    if "minilm" in result:
        goal["minilm_cosine_mean_at_25"] = result["minilm"]["keep_0.25"]["cosine_mean"]
        goal["minilm_oracle_cosine_mean_at_25"] = result["minilm"]["keep_0.25"]["oracle_cosine_mean"]
    result["goal"] = goal
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def print_table(result: dict[str, Any]) -> None:
    rows = [("tiny_lm", k, v) for k, v in result.get("tiny_lm", {}).items()]
    rows += [("tiny_lm_vllm", k, v) for k, v in result.get("tiny_lm_vllm_path", {}).items()]
    for seed, r in result.get("tiny_lm_seeds", {}).items():
        rows += [(f"tiny_lm_s{seed}", k, v) for k, v in r["per_head"].items()]
        rows += [(f"tiny_lm_s{seed}_vllm", k, v) for k, v in r["vllm_path"].items()]
    rows += [("minilm", k, v) for k, v in result.get("minilm", {}).items()]
    rows += [("minilm_vllm", k, v) for k, v in result.get("minilm_vllm_path", {}).items()]
    rows += [(f"planted_{t}", k, v) for t, r in result["planted"].items() for k, v in r.items()]
    rows += [(f"graded_{t}", k, v) for t, r in result["graded"].items() for k, v in r.items()]
    models = [result["tiny_lm_model"]] if "tiny_lm_model" in result else []
    models += [r["model"] for r in result.get("tiny_lm_seeds", {}).values()]
    for m in models:
        print(f"tiny_lm seed {m['config']['seed']}: causal byte-level model, {m['params']} params, {m['steps']} steps "
              f"({m['train_s']}s{', cached' if m['cached'] else ''}): bits/byte {m['first_step_bits_per_byte']} at "
              f"step 1 -> {m['final_train_bits_per_byte']} train, {m['held_out_bits_per_byte']} held out (uniform: 8.0)")
    print(f"{'data':<16}{'keep':<10}{'cos_mean':>9}{'oracle':>9}{'cos_p1':>9}{'max_err':>9}{'recall':>8}{'needle':>8}"
          f"{'bytes_x':>8}{'ms':>9}{'dense_ms':>9}")
    for data, keep, v in rows:
        print(f"{data:<16}{keep:<10}{v['cosine_mean']:>9.4f}{v.get('oracle_cosine_mean', float('nan')):>9.4f}{v['cosine_p1']:>9.4f}{v['max_abs_err']:>9.4f}"
              f"{v['topk_recall']:>8.3f}{v.get('needle_recall', float('nan')):>8.3f}{v['bytes_reduction']:>8.2f}"
              f"{v['attn_ms_per_step']:>9.3f}{v['dense_attn_ms_per_step']:>9.3f}")
    if "offload" in result:
        print("offload:", {k: v for k, v in result["offload"].items()})
    if "tiny_lm_vllm_offload" in result:
        print("tiny_lm vLLM-path offload:", result["tiny_lm_vllm_offload"])


def main(args: argparse.Namespace) -> int:
    if args.serving:
        return sparse_serving.main(args)
    result = run(args)
    if not args.json:
        print_table(result)
    print(json.dumps(result, sort_keys=True))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    parser.add_argument("--tokens", type=int, nargs="*", default=[32768, 131072],
                        help="planted context lengths (tokens)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head (GQA)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--minilm-block-size", type=int, default=16)
    parser.add_argument("--stride", type=int, default=BlockRetrievalConfig.retrieval_stride, help="retrieval_stride")
    parser.add_argument("--summary", choices=rm.SUMMARY_KINDS, default=BlockRetrievalConfig.summary)
    parser.add_argument("--windows", type=int, default=2, help="512-token text windows through MiniLM")
    parser.add_argument("--decode-steps", type=int, default=16, help="decoded positions per window and layer")
    parser.add_argument("--planted-steps", type=int, default=8)
    parser.add_argument("--graded-needles", type=int, default=256,
                        help="needles of graded strength in the second planted variant (0 disables it)")
    parser.add_argument("--offload-tokens", type=int, default=32768, help="0 disables the offload run")
    parser.add_argument("--offload-host-blocks", type=int, default=BlockRetrievalConfig.host_cache_blocks,
                        help="host_cache_blocks of the vLLM-path offload run (tiny_lm)")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-tiny-lm", action="store_true",
                        help="skip the causal models trained here (the first run trains each seed for ~5 minutes)")
    parser.add_argument("--lm-windows", type=int, default=4, help="2048-byte held-out windows through tiny_lm")
    parser.add_argument("--lm-decode-steps", type=int, default=32, help="decoded positions per window and layer")
    parser.add_argument("--lm-block-size", type=int, default=16)
    parser.add_argument("--lm-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds of tiny_lm: the first is reported as tiny_lm, the goal must hold on all")
    parser.add_argument("--threads", type=int, default=2)
    sparse_serving.register(parser)
    parser.set_defaults(func=main)


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="ucm bench sparse")
    register(p)
    a = p.parse_args()
    raise SystemExit(a.func(a))
