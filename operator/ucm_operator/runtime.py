"""The operator process: kopf watches UCMClusters and their children, a work queue coalesces the
events into one reconcile per cluster at a time, and worker threads run `Reconciler.reconcile`.

Why not kopf's create/update handlers: they persist handler progress in annotations (a write per
change) and need finalizers for deletion; the design here needs neither. `@kopf.on.event` handlers
only enqueue the cluster's key, so kopf itself writes nothing and every write comes from the
reconciler, which writes only what changed. A periodic resync re-enqueues every known cluster to
repair drift that produced no event.

Two watches are not of children: nodes (a cluster refused because no node it can reach has the
GPUs its pools ask for is re-checked when a node's labels, taints or GPUs change) and every
PersistentVolumeClaim of the watched namespaces (a user's existingClaim carries no label of ours;
when one changes, the clusters of its namespace are re-checked).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import signal
import threading
import time
from typing import Any

import kopf

from .constants import (
    GROUP,
    LABEL_CLUSTER,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    POOL_PLURAL,
    STORE_SCRAPE_SECONDS,
    VERSION,
)
from .facts import NodeFacts
from .kube import Kube, load_api_client
from .metrics import PassStats
from .metrics import render as render_metrics
from .reconcile import Reconciler

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)

# Children whose changes can change the status or need repair: (group, version, plural).
WATCHED_CHILDREN: tuple[tuple[str, str, str], ...] = (
    (GROUP, VERSION, POOL_PLURAL),   # a /scale write (kubectl scale, HPA) resizes the pool's Deployment
    ("apps", "v1", "deployments"),
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
)


def connection_info(trust_env: bool = False) -> kopf.ConnectionInfo:
    """kopf's credentials from the same lookup as the reconciler's client (`load_api_client`:
    --kubeconfig/$KUBECONFIG, ~/.kube/config, in-cluster), read afresh on every (re-)login so
    rotated service-account tokens are picked up."""
    config = load_api_client(pool_size=1).configuration
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
        username=config.username or None, password=config.password or None,
        scheme=scheme or ("Bearer" if token else None), token=token or None,
        certificate_path=config.cert_file, private_key_path=config.key_file, trust_env=trust_env,
    )


class WorkQueue:
    """client-go style: a key is queued at most once; a key added while being processed is
    processed once more afterwards; one worker per key at a time. `delay` holds a newly dirty key
    back briefly so that a burst of events (a rollout touches pods, ReplicaSets and Deployments
    many times a second) becomes one reconcile instead of dozens."""

    def __init__(self, delay: float = 0.0) -> None:
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._dirty: set[Key] = set()
        self._processing: set[Key] = set()
        self._delay = delay

    def add(self, key: Key) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._schedule(key)

    def _schedule(self, key: Key) -> None:
        if self._delay > 0:
            asyncio.get_running_loop().call_later(self._delay, self._queue.put_nowait, key)
        else:
            self._queue.put_nowait(key)

    def add_after(self, key: Key, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.add, key)

    async def get(self) -> Key:
        key = await self._queue.get()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Key) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._schedule(key)

    @property
    def idle(self) -> bool:
        return not self._dirty and not self._processing


@dataclasses.dataclass
class Options:
    namespaces: tuple[str, ...] = ()     # empty: all namespaces
    workers: int = 4
    resync_seconds: float = 300.0
    debounce_seconds: float = 0.5
    liveness_endpoint: str | None = None
    # After a stop, how long reconciles already running get to finish. A reconcile blocked on an
    # API call that never returns must not hold the process past the pod's grace period; what it
    # left half-done the next operator's first pass repairs (every write is idempotent).
    drain_seconds: float = 10.0
    # Where autoscaled clusters' router metrics are read when pod IPs are unreachable (signals.py).
    router_metrics_url: str | None = None
    # Where the workers' vLLM /metrics are read for status.store instead of pod IPs, and how
    # often (0: never; signals.py, store_usage.py).
    worker_metrics_urls: tuple[str, ...] = ()
    store_scrape_seconds: float = STORE_SCRAPE_SECONDS


class Operator:
    """One operator instance; `run()` blocks until stopped (signal or `stop()`)."""

    def __init__(self, options: Options, kube: Kube | None = None) -> None:
        self.options = options
        self.kube = kube or Kube(load_api_client(pool_size=options.workers + 4))
        self.reconciler = Reconciler(self.kube, options.router_metrics_url, options.worker_metrics_urls,
                                     options.store_scrape_seconds)
        self.pass_stats = PassStats()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self.known: set[Key] = set()
        self._node_facts: dict[str, NodeFacts] = {}
        self._failures: dict[Key, int] = {}
        self._seen: set[Key] = set()
        self._stop: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._ready = threading.Event()
        self._queue: WorkQueue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: dict[concurrent.futures.Future[Any], Key] = {}
        self.abandoned: list[Key] = []   # clusters whose reconcile was still running when drain ended
        self.resyncs = 0

    # --- kopf wiring ---------------------------------------------------------------------------

    def _registry(self) -> kopf.OperatorRegistry:
        """kopf handlers, all `async`: kopf runs them on its event loop (sync ones would run in
        threads), where they only touch the work queue."""
        registry = kopf.OperatorRegistry()

        @kopf.on.login(registry=registry)
        def login(**kwargs: Any) -> kopf.ConnectionInfo:
            return connection_info(kwargs["settings"].networking.trust_env)

        @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
        async def on_cluster(**kwargs: Any) -> None:
            key = (str(kwargs["namespace"]), str(kwargs["name"]))
            if kwargs["event"].get("type") == "DELETED":
                self.known.discard(key)
                return
            self.known.add(key)
            self._enqueue(key)

        async def on_child(**kwargs: Any) -> None:
            cluster = (kwargs["labels"] or {}).get(LABEL_CLUSTER)
            if cluster:
                self._enqueue((str(kwargs["namespace"]), str(cluster)))

        for group, version, plural in WATCHED_CHILDREN:
            kopf.on.event(group or "", version, plural, registry=registry, id=f"child-{plural}",
                          labels={LABEL_MANAGED_BY: MANAGED_BY, LABEL_CLUSTER: kopf.PRESENT})(on_child)

        @kopf.on.event("", "v1", "persistentvolumeclaims", registry=registry)
        async def on_claim(**kwargs: Any) -> None:
            cluster = (kwargs["labels"] or {}).get(LABEL_CLUSTER)
            namespace = str(kwargs["namespace"])
            if cluster and (kwargs["labels"] or {}).get(LABEL_MANAGED_BY) == MANAGED_BY:
                self._enqueue((namespace, str(cluster)))
                return
            for key in sorted(k for k in self.known if k[0] == namespace):  # maybe someone's existingClaim
                self._enqueue(key)

        @kopf.on.event("", "v1", "nodes", registry=registry)
        async def on_node(**kwargs: Any) -> None:
            name = str(kwargs["name"])
            facts = None if kwargs["event"].get("type") == "DELETED" else NodeFacts.of(kwargs["body"])
            if self._node_facts.get(name) == facts:
                return   # a status heartbeat, not a change of what pools can use
            if facts is None:
                self._node_facts.pop(name, None)
            else:
                self._node_facts[name] = facts
            for key in sorted(self.known):
                self._enqueue(key)
        return registry

    def _settings(self) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        settings.posting.enabled = False          # the reconciler posts its own, deduplicated Events
        settings.scanning.disabled = True         # no cluster-wide CRD/namespace watching (RBAC)
        settings.peering.standalone = True        # one replica; no peering objects to keep alive
        settings.peering.mandatory = False
        settings.watching.server_timeout = 300
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        for group, _version, plural in WATCHED_CHILDREN:
            # Server-side filtering: the operator never downloads pods or services it does not own.
            settings.watching.label_selectors[(group, plural) if group else plural] = selector
        return settings

    def _enqueue(self, key: Key) -> None:
        if self._queue is not None:
            self._queue.add(key)

    # --- workers -----------------------------------------------------------------------------

    async def _worker(self, executor: concurrent.futures.Executor) -> None:
        assert self._queue is not None
        while True:
            key = await self._queue.get()
            started = time.monotonic()
            ok = False
            try:
                future = executor.submit(self.reconciler.reconcile, *key)
                self._in_flight[future] = key
                try:
                    outcome = await asyncio.wrap_future(future)
                finally:
                    if future.done():  # a cancelled wait leaves the running thread to `_drain`
                        del self._in_flight[future]
                if outcome.writes:
                    # One line per pass that wrote anything: a quiet log is a no-op resync.
                    log.info("reconciled %s/%s: applied %d, pruned %d, status %s, pool statuses %d, events %d, "
                             "scaled %d", key[0], key[1], outcome.applied, outcome.pruned,
                             "written" if outcome.status_written else "unchanged", outcome.pool_statuses,
                             outcome.events, outcome.scaled)
                if key not in self._seen:
                    self._seen.add(key)
                    log.info("first pass over %s/%s done: %d writes", key[0], key[1], outcome.writes)
                if outcome.requeue_after:
                    self._schedule_pass(key, outcome.requeue_after)
                if outcome.errors:
                    raise RuntimeError("; ".join(outcome.errors))
                self._failures.pop(key, None)
                ok = True
            except Exception as exc:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(60.0, 0.5 * 2 ** min(failures, 7))
                log.warning("reconcile %s/%s failed (%s); retrying in %.1fs", key[0], key[1], exc, delay)
                self._queue.add_after(key, delay)
            finally:
                self.pass_stats.record(time.monotonic() - started, ok)
                self._queue.done(key)

    def _schedule_pass(self, key: Key, delay: float) -> None:
        """One timed pass per key at a time (an autoscaled cluster's interval): event-driven
        passes in between do not pile up more timers."""
        assert self._queue is not None
        if key in self._timers:
            return
        queue = self._queue

        def fire() -> None:
            self._timers.pop(key, None)
            if key in self.known:
                queue.add(key)
        self._timers[key] = asyncio.get_running_loop().call_later(delay, fire)

    def metrics_text(self) -> str:
        """The operator's Prometheus metrics (metrics.py), from the counters kept anyway."""
        writes, dry_runs, calls = self.kube.counters()
        return render_metrics(self.pass_stats, writes, dry_runs, calls, self.resyncs, len(self.known))

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.options.resync_seconds)
            self.resync_now()

    def resync_now(self) -> None:
        """Re-enqueue every known cluster (thread-safe)."""
        def enqueue_all() -> None:
            self.resyncs += 1
            log.info("resync #%d: %d clusters", self.resyncs, len(self.known))
            for key in sorted(self.known):
                self._enqueue(key)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(enqueue_all)

    def wait_idle(self, timeout: float, settle: float = 0.5) -> bool:
        """Block until the queue has been empty for `settle` seconds (tests, bench)."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if self._queue is not None and self._queue.idle:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle:
                    return True
            else:
                quiet_since = None
            time.sleep(0.05)
        return False

    async def main(self) -> None:
        self._loop = asyncio.get_running_loop()
        # An asyncio stop flag: kopf waits for a threading.Event in an executor thread, which
        # would hold up every signal-initiated shutdown until that thread is released.
        self._stop = asyncio.Event()
        if self._stop_requested.is_set():
            self._stop.set()
        self._queue = WorkQueue(self.options.debounce_seconds)
        executor = concurrent.futures.ThreadPoolExecutor(self.options.workers, thread_name_prefix="reconcile")
        tasks = [asyncio.create_task(self._worker(executor)) for _ in range(self.options.workers)]
        tasks.append(asyncio.create_task(self._resync()))
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(self._when_ready(ready)))
        try:
            await kopf.operator(
                registry=self._registry(), settings=self._settings(),
                clusterwide=not self.options.namespaces, namespaces=list(self.options.namespaces),
                standalone=True, liveness_endpoint=self.options.liveness_endpoint,
                stop_flag=self._stop, ready_flag=ready,
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            executor.shutdown(wait=False, cancel_futures=True)
            await self._drain()

    async def _drain(self) -> None:
        """Give running reconciles `drain_seconds` to finish; name those that did not."""
        running = [f for f in self._in_flight if not f.done()]
        if running:
            log.info("stopping: waiting up to %.0fs for %d running reconciles", self.options.drain_seconds,
                     len(running))
            await asyncio.wait([asyncio.wrap_future(f) for f in running], timeout=self.options.drain_seconds)
        self.abandoned = sorted(self._in_flight[f] for f in running if not f.done())
        for namespace, name in self.abandoned:
            log.warning("stopping: abandoned the reconcile of %s/%s, still running after %.0fs "
                        "(the next operator's first pass finishes it)", namespace, name, self.options.drain_seconds)

    async def _when_ready(self, ready: asyncio.Event) -> None:
        await ready.wait()
        if threading.current_thread() is threading.main_thread():
            # Route SIGTERM/SIGINT to the stop flag instead of kopf's own signal future: kopf
            # leaves its stop-flag waiter pending on the signal path and then waits 5 s for it.
            assert self._stop is not None
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, self._stop.set)
        self._ready.set()

    def run(self) -> None:
        """Until stopped. Reconcile threads in `abandoned` are still running when this returns:
        a process that wants to exit must not join them (`cmd_run` exits without waiting)."""
        asyncio.run(self.main())

    # --- in-process use (bench, tests) ----------------------------------------------------------

    def start_in_thread(self, timeout: float = 60.0) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="ucm-operator", daemon=True)
        thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("operator did not become ready")
        return thread

    def stop(self) -> None:
        """Stop a running operator from any thread."""
        self._stop_requested.set()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

