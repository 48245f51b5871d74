"""The `ucm` command line: a thin dispatcher.

Each area owns its sub-commands in its own module, which exposes
`register(parser: argparse.ArgumentParser) -> None`; `register` adds the arguments (and nested
sub-commands) and sets `func`, a callable taking the parsed namespace and returning an exit code.
Modules are imported only when their command is chosen, so `ucm --help` stays fast and
`ucm store ...` works on a machine that has neither vLLM nor aiohttp.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "store": ("ucm.store.cli", "inspect, benchmark and garbage-collect a UCM store directory"),
    "router": ("ucm.router.cli", "run the prefill/decode router"),
    "model": ("ucm.serve.cli", "prepare offline model directories for vllm serve"),
}
# `ucm bench <name>` -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "transfer": ("ucm.bench.transfer", "gather/scatter throughput of the KV transfer path"),
    "router": ("ucm.bench.router", "latency and throughput added by the PD router"),
    "sparse": ("ucm.bench.sparse", "accuracy and bytes read of sparse attention"),
    "blend": ("ucm.bench.blend", "cache blend on RAG prompts: TTFT and quality vs full recompute, prefix-only, naive reuse"),
    "window": ("ucm.bench.window", "loss by position past the trained window: plain RoPE vs vLLM YaRN vs ReRoPE"),
    "serve": ("ucm.bench.serve", "TTFT of real vllm serve processes: recompute vs prefix cache vs ExampleConnector vs UCM"),
}


def _add_lazy(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    table: dict[str, tuple[str, str]],
    chosen: str | None,
) -> None:
    for name, (module, help_text) in table.items():
        parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).register(parser)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucm", description="UCM — a shared, persistent KV cache for vLLM")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first = argv[0] if argv else None
    _add_lazy(sub, COMMANDS, first)
    bench = sub.add_parser("bench", help="benchmarks that print numbers with a same-run baseline")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_lazy(bench_sub, BENCHMARKS, argv[1] if first == "bench" and len(argv) > 1 else None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(args_list).parse_args(args_list)
    func = cast(Callable[[argparse.Namespace], int], args.func)
    return int(func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
