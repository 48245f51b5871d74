"""`ucm router serve`: run the PD router.

    ucm router serve --host 0.0.0.0 --port 8000 --model SERVED_NAME
       (--discovery kubernetes --namespace NS --cluster NAME | --prefill URL [...] --decode URL [...])
       [--fallback decode-only|fail] [--policy least-loaded|prefix-affinity]

Static lists may also come from the environment: UCM_ROUTER_PREFILL / UCM_ROUTER_DECODE
(comma-separated URLs), used when the flags are absent.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from ucm.router.config import RouterConfig
from ucm.router.health import Discovery, StaticDiscovery
from ucm.router.loop import run
from ucm.router.server import RouterServer

log = logging.getLogger("ucm.router")
_GC_YOUNG_THRESHOLD = 20_000


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="router_command", required=True, metavar="SUBCOMMAND")
    serve = sub.add_parser(
        "serve", help="serve the OpenAI API, routing each request through prefill then decode"
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=serve_main)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = RouterConfig(model="x")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--model", required=True, help="the served model name clients must use")
    p.add_argument(
        "--discovery",
        choices=("static", "kubernetes"),
        default=None,
        help="static URL lists (default when --prefill/--decode are given) or Kubernetes EndpointSlices",
    )
    p.add_argument("--namespace", help="Kubernetes namespace of the UCMCluster (default: the pod's own)")
    p.add_argument("--cluster", help="UCMCluster name (selects ucm.dev/cluster=NAME)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    p.add_argument(
        "--upstream-port", type=int, default=8000, help="port used when an EndpointSlice lists no port"
    )
    p.add_argument(
        "--prefill", action="append", default=[], metavar="URL", help="static prefill endpoint (repeat)"
    )
    p.add_argument(
        "--decode", action="append", default=[], metavar="URL", help="static decode endpoint (repeat)"
    )
    p.add_argument(
        "--fallback",
        choices=("decode-only", "fail"),
        default=d.fallback,
        help="when no prefill is available or prefill fails: send to decode alone, or fail",
    )
    p.add_argument("--policy", choices=("least-loaded", "prefix-affinity"), default=d.policy)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=d.max_header_bytes,
        help="longest request line or header field a client may send (431 beyond)",
    )
    p.add_argument(
        "--max-headers",
        type=int,
        default=d.max_headers,
        help="most header fields in one request (431 beyond)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout_s,
        metavar="S",
        help="a client must send a request's headers within this long (408, then the connection closes)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout_s,
        metavar="S",
        help="a client must send a request's body within this long after its headers (408)",
    )
    p.add_argument("--max-concurrent", type=int, default=d.max_concurrent)
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s, metavar="S")
    p.add_argument("--first-byte-timeout", type=float, default=d.first_byte_timeout_s, metavar="S")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, metavar="S")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        metavar="S",
        help="non-streaming decode: time to the whole answer",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout_s,
        metavar="S",
        help="after SIGTERM: how long in-flight requests and streams may finish",
    )
    p.add_argument(
        "--shutdown-delay",
        type=float,
        default=d.shutdown_delay_s,
        metavar="S",
        help="after SIGTERM: keep serving this long with /ready failing, then drain",
    )
    p.add_argument("--eject-after-failures", type=int, default=d.eject_after_failures)
    p.add_argument("--eject-base", type=float, default=d.eject_base_s, metavar="S")
    p.add_argument("--eject-max", type=float, default=d.eject_max_s, metavar="S")
    p.add_argument(
        "--probe-interval",
        type=float,
        default=d.probe_interval_s,
        metavar="S",
        help="seconds between GET /health probes of every upstream; 0 turns them off",
    )
    p.add_argument("--probe-timeout", type=float, default=d.probe_timeout_s, metavar="S")
    p.add_argument("--affinity-prefix-blocks", type=int, default=d.affinity_prefix_blocks)
    p.add_argument("--affinity-slack", type=int, default=d.affinity_slack)
    p.add_argument("--log-level", default="INFO")


def build_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        fallback=args.fallback,
        policy=args.policy,
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_concurrent=args.max_concurrent,
        connect_timeout_s=args.connect_timeout,
        first_byte_timeout_s=args.first_byte_timeout,
        idle_timeout_s=args.idle_timeout,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        shutdown_delay_s=args.shutdown_delay,
        eject_after_failures=args.eject_after_failures,
        eject_base_s=args.eject_base,
        eject_max_s=args.eject_max,
        probe_interval_s=args.probe_interval,
        probe_timeout_s=args.probe_timeout,
        affinity_prefix_blocks=args.affinity_prefix_blocks,
        affinity_slack=args.affinity_slack,
    )


def _env_list(name: str) -> list[str]:
    return [u for u in os.environ.get(name, "").split(",") if u.strip()]


def build_discovery(args: argparse.Namespace) -> Discovery:
    prefill = args.prefill or _env_list("UCM_ROUTER_PREFILL")
    decode = args.decode or _env_list("UCM_ROUTER_DECODE")
    mode = args.discovery or ("kubernetes" if args.cluster and not (prefill or decode) else "static")
    if mode == "kubernetes":
        if not args.cluster:
            raise ValueError("--discovery kubernetes needs --cluster NAME (the UCMCluster to route for)")
        from ucm.router.kube import KubernetesDiscovery, own_namespace

        namespace = args.namespace or own_namespace()
        if not namespace:
            raise ValueError("--namespace is required outside a pod (no service-account namespace file)")
        return KubernetesDiscovery(
            namespace, args.cluster, kubeconfig=args.kubeconfig, default_port=args.upstream_port
        )
    if not decode:
        raise ValueError(
            "static discovery needs at least one --decode URL (or UCM_ROUTER_DECODE); "
            "or use --discovery kubernetes --cluster NAME"
        )
    return StaticDiscovery(prefill, decode)


async def _serve(config: RouterConfig, discovery: Discovery) -> None:
    server = RouterServer(config, discovery)
    await server.start()
    # Everything allocated so far (imported modules, the app) lives for the whole process: move it
    # out of the collector's reach, so young-generation collections under load stay short (a full
    # collection otherwise walks ~45k start-up objects and stalls every stream for tens of ms).
    gc.freeze()
    # The relay allocates many short-lived containers (parser, futures, response objects) that
    # die by reference counting; at the default threshold (700) the collector ran ~60 times a
    # second at ~1200 streams/s (6-7% of the router's CPU, and its full collections stalled every
    # stream). At 20000 it ran 3 times in 8 s of the same load (0.15% of the CPU; user CPU per
    # request 0.50-0.57 -> 0.45-0.47 ms). Reference cycles are still collected.
    gc.set_threshold(_GC_YOUNG_THRESHOLD, 10, 10)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown()
    log.info("router stopped")


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = build_config(args)
        discovery = build_discovery(args)
    except ValueError as exc:
        print(f"ucm router serve: {exc}", file=sys.stderr)
        return 2
    try:
        run(_serve(config, discovery))
    except ValueError as exc:  # e.g. unreadable kubeconfig, found only when discovery starts
        print(f"ucm router serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"ucm router serve: {exc} (listening on {config.host}:{config.port})", file=sys.stderr)
        return 2
    return 0
