"""`ucm store bench|stats|gc`: benchmark, inspect and garbage-collect a store directory."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import sys

from ucm.store.base import StoreError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes from '1000', '500M' (1e6), '2Gi' (2**30)...; argparse turns ValueError into a usage error."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or a number with k/M/G/T or Ki/Mi/Gi/Ti)"
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")

    bench = sub.add_parser("bench", help="store dump/load vs a same-run raw disk baseline, lookup, hashing")
    bench.add_argument(
        "--path", required=True, help="directory on the filesystem to measure (a temp dir is made in it)"
    )
    bench.add_argument(
        "--block-mib", type=float, default=2.0, help="block size in MiB (default 2: Llama-8B, 16 tokens)"
    )
    bench.add_argument("--blocks", type=int, default=128, help="blocks per round (default 128)")
    bench.add_argument(
        "--threads", type=int, default=4, help="I/O threads for both raw and store (default 4)"
    )
    bench.add_argument("--rounds", type=int, default=5, help="alternating raw/store rounds; medians reported")
    bench.add_argument("--direct", action="store_true", help="O_DIRECT for both raw and store")
    bench.add_argument(
        "--fsync", action="store_true", help="fsync every block (raw) / durability=fsync (store)"
    )
    bench.add_argument(
        "--json", action="store_true", help="no progress bar; the last line is one JSON object"
    )
    bench.set_defaults(func=_bench)

    stats = sub.add_parser(
        "stats", help="blocks, bytes, salts seen, damaged objects and temp files of a store"
    )
    stats.add_argument("--path", required=True, help="the store directory")
    stats.add_argument(
        "--sample", type=int, default=1000, help="headers to read for salts and layouts (default 1000)"
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_stats)

    gc = sub.add_parser("gc", help="evict least recently used blocks down to a size; remove stale temp files")
    gc.add_argument("--path", required=True, help="the store directory")
    gc.add_argument("--max-bytes", type=parse_size, default=None, help="evict LRU blocks until usage <= this")
    gc.add_argument(
        "--temp-age", type=float, default=3600.0, help="remove temp/quarantined files older than this (s)"
    )
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    gc.set_defaults(func=_gc)


def _fail(command: str, error: Exception) -> int:
    print(f"ucm store {command}: {error}", file=sys.stderr)
    return 2


def _bench(args: argparse.Namespace) -> int:
    from ucm.store.bench import format_table, run_bench

    logging.basicConfig(level=logging.WARNING)
    try:
        result = run_bench(args)
    except (StoreError, OSError) as exc:
        return _fail("bench", exc)
    if not args.json:
        print(format_table(result))
    print(json.dumps(result))
    return 0


def _when(ts: object) -> str:
    if not isinstance(ts, float):
        return "-"
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _stats(args: argparse.Namespace) -> int:
    from ucm.store.maintenance import store_report

    try:
        report = store_report(args.path, sample=args.sample)
    except (ValueError, OSError) as exc:
        return _fail("stats", exc)
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    print(f"store        {report.path}")
    print(f"blocks       {report.blocks}")
    print(f"bytes        {report.bytes} ({report.bytes / 1e9:.3f} GB)")
    print(f"oldest/newest {_when(report.oldest_mtime)} / {_when(report.newest_mtime)}")
    print(f"temp files   {report.temp_files} ({report.temp_bytes} bytes; `ucm store gc` removes old ones)")
    print(f"quarantined  {report.quarantined} damaged objects")
    print(f"sampled      {report.sampled} headers, {report.corrupt_in_sample} damaged")
    for salt, count in sorted(report.salts.items(), key=lambda kv: -kv[1]):
        print(f"salt         {salt}  ({count} sampled objects)")
    for layout, count in sorted(report.layouts.items(), key=lambda kv: -kv[1]):
        print(f"layout       {layout}  ({count} sampled objects)")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from ucm.store.maintenance import collect_garbage

    if args.temp_age < 0:
        return _fail("gc", ValueError(f"--temp-age must be >= 0, got {args.temp_age}"))
    try:
        result = collect_garbage(args.path, args.max_bytes, args.temp_age)
    except (ValueError, OSError) as exc:
        return _fail("gc", exc)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"evicted {result.evicted_blocks} blocks ({result.evicted_bytes} bytes), {result.remaining_bytes} bytes "
            f"remain; removed {result.temps_removed} stale temp files and {result.quarantine_removed} quarantined"
        )
    return 0
