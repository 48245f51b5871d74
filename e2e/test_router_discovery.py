"""Router discovery against the real control plane.

Pods (made Ready by kwok) with the operator's labels sit behind one headless Service per role;
the kube-controller-manager's endpointslice controller builds the EndpointSlices, and the router
(`KubernetesDiscovery`, watching, in a thread of this process) must follow pods as they come,
turn unready and go, and never pair a prefill and a decode of different revisions. The router's
view is read from its `/debug/endpoints` over HTTP; pod IPs are fake, so no traffic goes to them.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from kubernetes import client

from e2e.access import ClusterAccess
from e2e.wait import wait_for
from ucm.router.config import RouterConfig
from ucm.router.kube import KubernetesDiscovery
from ucm.router.server import RouterServer

pytestmark = pytest.mark.e2e

CLUSTER = "llm"
T = TypeVar("T")


class RouterThread:
    """A RouterServer with Kubernetes discovery on its own event loop (the test itself blocks).
    Active probes are off: the pod IPs are fake and must never receive traffic."""

    def __init__(self, kubeconfig: str, namespace: str) -> None:
        config = RouterConfig(model="m", host="127.0.0.1", port=0, fallback="fail", probe_interval_s=0)
        self.server = RouterServer(config, KubernetesDiscovery(namespace, CLUSTER, kubeconfig=kubeconfig))
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="router", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._started.set()
        self.loop.run_forever()

    def start(self) -> None:
        self.thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def call(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the router's loop (its registry is not meant to be touched from elsewhere)."""

        async def on_loop() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(10)

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.server.port}{path}", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def view(self) -> dict[str, list[str]]:
        """revision -> sorted pod names of available endpoints, as 'role/pod'."""
        _, body = self.get("/debug/endpoints")
        out: dict[str, list[str]] = {}
        for revision, info in body["revisions"].items():
            out[revision] = sorted(
                f"{role}/{e['name']}" for role in ("prefill", "decode") for e in info[role]
            )
        return out


def headless_service(role: str, cluster: str = CLUSTER) -> client.V1Service:
    labels = {"ucm.dev/cluster": cluster, "ucm.dev/role": role}
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=f"{cluster}-{role}", labels=labels),
        spec=client.V1ServiceSpec(
            cluster_ip="None",
            selector=labels,
            ports=[client.V1ServicePort(name="http", port=8000, target_port=8000)],
        ),
    )


def worker_pod(
    name: str, role: str, revision: str, *, ready: bool = True, cluster: str = CLUSTER
) -> client.V1Pod:
    labels = {
        "ucm.dev/cluster": cluster,
        "ucm.dev/role": role,
        "ucm.dev/pool": f"{role}-pool",
        "ucm.dev/revision": revision,
    }
    annotations = None if ready else {"ucm.dev/kwok-ready": "false"}
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels, annotations=annotations),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="vllm",
                    image="registry.k8s.io/pause:3.10",
                    ports=[client.V1ContainerPort(container_port=8000)],
                )
            ],
            termination_grace_period_seconds=0,
        ),
    )


def test_router_follows_endpointslices_and_never_mixes_revisions(
    k8s_api: client.ApiClient, cluster: ClusterAccess, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    for role in ("prefill", "decode"):
        core.create_namespaced_service(namespace, headless_service(role))
    # another UCMCluster in the same namespace: must stay invisible to this router
    core.create_namespaced_service(namespace, headless_service("prefill", cluster="other"))
    core.create_namespaced_pod(namespace, worker_pod("other-p", "prefill", "a", cluster="other"))
    core.create_namespaced_pod(namespace, worker_pod("p-a-0", "prefill", "a"))
    core.create_namespaced_pod(namespace, worker_pod("d-a-0", "decode", "a"))

    router = RouterThread(str(cluster.kubeconfig), namespace)
    router.start()
    try:
        want_a = ["decode/d-a-0", "prefill/p-a-0"]
        wait_for(lambda: router.view() == {"a": want_a}, "the router to see revision a's pair", timeout_s=60)
        assert router.get("/ready")[0] == 200

        # a new revision starts: its prefill alone is not a pair, and an unready decode is ignored
        core.create_namespaced_pod(namespace, worker_pod("p-b-0", "prefill", "b"))
        core.create_namespaced_pod(namespace, worker_pod("d-b-slow", "decode", "b", ready=False))
        wait_for(lambda: router.view().get("b") == ["prefill/p-b-0"], "revision b's prefill", timeout_s=60)
        assert router.get("/debug/endpoints")[1]["complete_revisions"] == ["a"]

        core.create_namespaced_pod(namespace, worker_pod("d-b-0", "decode", "b"))
        wait_for(
            lambda: router.view() == {"a": want_a, "b": ["decode/d-b-0", "prefill/p-b-0"]},
            "both revisions complete",
            timeout_s=60,
        )
        # every route the router would take stays inside one revision (no traffic: pod IPs are fake)
        registry = router.server.registry

        def pairs() -> list[tuple[str, str, str]]:
            out = []
            for key in [None, *(bytes([i]) * 16 for i in range(16))]:
                route = registry.choose_route(key)
                decode = registry.choose_decode(route.revision) if route else None
                assert route is not None and decode is not None
                out.append((route.revision, route.prefill.endpoint.revision, decode.endpoint.revision))
            return out

        assert all(rev == p_rev == d_rev for rev, p_rev, d_rev in router.call(pairs))
        by_url = {s.endpoint.name: s.endpoint for s in router.call(registry.states)}
        assert by_url["p-a-0"].pool == "prefill-pool" and by_url["p-a-0"].url.endswith(":8000")

        # the old revision goes away: the router drops it
        for name in ("p-a-0", "d-a-0"):
            core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        wait_for(lambda: "a" not in router.view(), "revision a to disappear", timeout_s=60)
        assert router.get("/debug/endpoints")[1]["complete_revisions"] == ["b"]

        # losing the last prefill leaves no pair: not ready (fallback=fail)
        core.delete_namespaced_pod("p-b-0", namespace, grace_period_seconds=0)
        wait_for(lambda: router.view() == {"b": ["decode/d-b-0"]}, "revision b without prefill", timeout_s=60)
        status, body = router.get("/ready")
        assert status == 503 and not body["ready"]
        assert all("other" not in name for names in router.view().values() for name in names)
    finally:
        router.stop()


def test_router_command_discovers_pairs_from_the_cluster(
    k8s_api: client.ApiClient, cluster: ClusterAccess, namespace: str
) -> None:
    """`ucm router serve --discovery kubernetes` as the operator runs it: ready once a pair exists."""
    core = client.CoreV1Api(k8s_api)
    for role in ("prefill", "decode"):
        core.create_namespaced_service(namespace, headless_service(role))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ucm", "router", "serve", "--host", "127.0.0.1", "--port", "0", "--model", "m",
         "--discovery", "kubernetes", "--namespace", namespace, "--cluster", CLUSTER,
         "--kubeconfig", str(cluster.kubeconfig), "--probe-interval", "0", "--fallback", "fail"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = 0
        while not port:
            line = proc.stderr.readline()
            assert line, f"router exited (rc={proc.poll()})"
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else 0
        threading.Thread(target=proc.stderr.read, daemon=True).start()

        def ready() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert ready() == 503  # no pods yet
        core.create_namespaced_pod(namespace, worker_pod("p-0", "prefill", "r1"))
        core.create_namespaced_pod(namespace, worker_pod("d-0", "decode", "r1"))
        wait_for(lambda: ready() == 200, "the router command to become ready", timeout_s=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
