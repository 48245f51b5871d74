"""`ucm-operator`: run the operator, render or validate a UCMCluster offline, benchmark it.

    ucm-operator run [--namespace NS ...] [--workers N] [--resync-seconds S] [--liveness URL]
    ucm-operator render -f cluster.yaml        # the manifests the operator would apply
    ucm-operator validate -f cluster.yaml      # the operator-side checks (exit 1 if invalid)
    ucm-operator bench [--clusters 50] [--json]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .constants import STORE_SCRAPE_SECONDS


def _load(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") if path != "-" else sys.stdin as handle:
        docs = [d for d in yaml.safe_load_all(handle) if d]
    clusters = [d for d in docs if isinstance(d, dict) and d.get("kind") == "UCMCluster"]
    if not clusters:
        raise SystemExit(f"{path}: no UCMCluster document found")
    return clusters


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import Operator, Options

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    namespaces = tuple(args.namespace or ())
    if not namespaces and os.environ.get("UCM_WATCH_NAMESPACE"):
        namespaces = (os.environ["UCM_WATCH_NAMESPACE"],)
    options = Options(namespaces=namespaces, workers=args.workers, resync_seconds=args.resync_seconds,
                      debounce_seconds=args.debounce_seconds, liveness_endpoint=args.liveness,
                      router_metrics_url=args.router_metrics_url,
                      worker_metrics_urls=tuple(args.worker_metrics_url or ()),
                      store_scrape_seconds=args.store_scrape_seconds)
    logging.getLogger(__name__).info("ucm-operator watching %s", ", ".join(namespaces) or "all namespaces")
    operator = Operator(options)
    if args.metrics_address:
        from .metrics import serve

        serve(args.metrics_address, operator.metrics_text)
    operator.run()
    if operator.abandoned:
        # The interpreter would join the stuck reconcile threads at exit, however long they take.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .autoscale import policy_problems
    from .build import build_children
    from .compat import check_cluster
    from .spec import SpecError, parse_cluster

    out: list[dict[str, Any]] = []
    for body in _load(args.file):
        if args.namespace:
            body.setdefault("metadata", {})["namespace"] = args.namespace
        try:
            spec = parse_cluster(body)
        except SpecError as exc:
            print(f"{args.file}: {exc}", file=sys.stderr)
            return 1
        problems = check_cluster(spec) + policy_problems(spec)
        if problems:
            for problem in problems:
                print(f"{args.file}: {problem}", file=sys.stderr)
            return 1
        out += build_children(spec)
    yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .autoscale import policy_problems
    from .compat import check_cluster
    from .spec import SpecError, parse_cluster

    status = 0
    for body in _load(args.file):
        name = body.get("metadata", {}).get("name", "?")
        try:
            spec = parse_cluster(body)
            problems = [str(p) for p in check_cluster(spec) + policy_problems(spec)]
        except SpecError as exc:
            problems = [str(exc)]
        for problem in problems:
            print(f"{args.file}: UCMCluster {name}: {problem}")
        print(f"{args.file}: UCMCluster {name}: {'valid' if not problems else 'NOT valid'}")
        status = status or int(bool(problems))
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucm-operator", description="The UCM Kubernetes operator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="reconcile UCMClusters against the current kubeconfig (or in-cluster)")
    run.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeatable); default: all")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    run.add_argument("--workers", type=int, default=4, help="clusters reconciled in parallel (default 4)")
    run.add_argument("--resync-seconds", type=float, default=300.0,
                     help="re-check every cluster this often even without events (default 300)")
    run.add_argument("--debounce-seconds", type=float, default=0.5,
                     help="coalesce a cluster's events for this long before reconciling it (default 0.5)")
    run.add_argument("--metrics-address", metavar="HOST:PORT",
                     help="serve the operator's Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md)")
    run.add_argument("--router-metrics-url", metavar="URL",
                     help="read autoscaled clusters' router metrics here instead of from the router pods' IPs "
                          "(an operator outside the cluster network); {namespace} and {name} are replaced")
    run.add_argument("--worker-metrics-url", metavar="URL", action="append",
                     help="read the store's usage from this worker /metrics URL instead of the worker pods' IPs "
                          "(repeatable; an operator outside the cluster network); {namespace} and {name} are replaced")
    run.add_argument("--store-scrape-seconds", type=float, default=STORE_SCRAPE_SECONDS,
                     help="read each cluster's worker pods' /metrics for status.store this often; "
                          f"0: never (default {STORE_SCRAPE_SECONDS:g})")
    run.add_argument("--liveness", metavar="URL", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    run.set_defaults(func=cmd_run)

    render = sub.add_parser("render", help="print the manifests the operator would apply for a UCMCluster file")
    render.add_argument("-f", "--file", required=True, help="YAML file with UCMCluster documents ('-': stdin)")
    render.add_argument("--namespace", help="namespace to render into (default: the file's, else default)")
    render.set_defaults(func=cmd_render)

    validate = sub.add_parser("validate", help="run the operator's own checks on a UCMCluster file")
    validate.add_argument("-f", "--file", required=True, help="YAML file with UCMCluster documents ('-': stdin)")
    validate.set_defaults(func=cmd_validate)

    from .bench import register as register_bench

    register_bench(sub.add_parser("bench", help="time to Serving for many UCMClusters; writes on a no-op resync"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for noisy in ("kopf.objects", "kopf.activities.authentication", "urllib3", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    # The operator's own level alone (e.g. DEBUG: what each status write changed), without kopf's.
    logging.getLogger("ucm_operator").setLevel(os.environ.get("UCM_OPERATOR_LOG_LEVEL", "").upper() or
                                               (logging.DEBUG if args.verbose else logging.INFO))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
