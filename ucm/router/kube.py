"""Kubernetes discovery: watch EndpointSlices and Pods (list once, then watch; never poll).

The operator creates one headless Service per role (labels `ucm.dev/cluster`, `ucm.dev/role`);
the endpointslice controller copies those labels onto the Service's EndpointSlices. The router
watches

* EndpointSlices labeled `ucm.dev/cluster=<name>,ucm.dev/role in (prefill,decode)`: which pod
  addresses serve each role and whether they are ready;
* Pods labeled `ucm.dev/cluster=<name>`: each endpoint's `ucm.dev/pool` and `ucm.dev/revision`
  (through the endpoint's targetRef) and its creation time (which orders revisions by age).

An endpoint is routable only when it is ready, its pod is known, not terminating, carries a
revision label and its role label agrees with the slice's. Every change republishes the whole
endpoint set to the registry. A watch that ends is resumed from the last resourceVersion; an
expired one (410) or any error triggers a fresh list after a capped backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from ucm.router.endpoints import Endpoint, Registry

log = logging.getLogger("ucm.router")

ROLE_LABEL = "ucm.dev/role"
CLUSTER_LABEL = "ucm.dev/cluster"
REVISION_LABEL = "ucm.dev/revision"
POOL_LABEL = "ucm.dev/pool"
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_WATCH_SECONDS = 240


def own_namespace() -> str | None:
    """The namespace of the pod this process runs in (None outside Kubernetes)."""
    try:
        return _SA_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def build_endpoints(
    slices: dict[str, dict[str, Any]], pods: dict[str, dict[str, Any]], default_port: int
) -> list[Endpoint]:
    """The routable endpoints from raw EndpointSlice and Pod objects (pure; see module doc)."""
    out: dict[tuple[str, str], Endpoint] = {}
    for sl in slices.values():
        role = (sl.get("metadata", {}).get("labels") or {}).get(ROLE_LABEL)
        if role not in ("prefill", "decode"):
            continue
        port = _slice_port(sl.get("ports") or [], default_port)
        for ep in sl.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            ref = ep.get("targetRef") or {}
            addresses = ep.get("addresses") or []
            if conditions.get("ready") is False or ref.get("kind") != "Pod" or not addresses:
                continue
            pod = pods.get(ref.get("name", ""))
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                continue
            labels = pod["metadata"].get("labels") or {}
            revision = labels.get(REVISION_LABEL)
            if not revision or labels.get(ROLE_LABEL, role) != role:
                continue
            host = addresses[0]
            if ":" in host:
                host = f"[{host}]"
            url = f"http://{host}:{port}"
            out[(role, url)] = Endpoint(
                url=url,
                role=role,
                revision=revision,
                pool=labels.get(POOL_LABEL, ""),
                name=pod["metadata"]["name"],
                created=_timestamp(pod["metadata"].get("creationTimestamp")),
            )
    return sorted(out.values(), key=lambda e: (e.role, e.url))


def _slice_port(ports: list[dict[str, Any]], default: int) -> int:
    numbered = [p for p in ports if p.get("port")]
    for p in numbered:
        if p.get("name") == "http":
            return int(p["port"])
    return int(numbered[0]["port"]) if numbered else default


def _timestamp(value: Any) -> float:
    if value is None:
        return 0.0
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class KubernetesDiscovery:
    def __init__(
        self,
        namespace: str,
        cluster: str,
        *,
        kubeconfig: str | None = None,
        default_port: int = 8000,
        sync_timeout_s: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.default_port = default_port
        self.sync_timeout_s = sync_timeout_s
        self.slices: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self._registry: Registry | None = None
        self._api: client.ApiClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._synced = {"slices": asyncio.Event(), "pods": asyncio.Event()}

    async def _api_client(self) -> client.ApiClient:
        source = self.kubeconfig or (
            "the in-cluster service account"
            if os.environ.get("KUBERNETES_SERVICE_HOST")
            else "~/.kube/config"
        )
        try:
            if self.kubeconfig:
                return await config.new_client_from_config(config_file=self.kubeconfig)
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()  # type: ignore[no-untyped-call]
                return client.ApiClient()
            return await config.new_client_from_config()
        except Exception as exc:
            raise ValueError(f"cannot load Kubernetes credentials from {source}: {exc}") from exc

    async def start(self, registry: Registry) -> None:
        self._registry = registry
        self._api = await self._api_client()
        discovery_api = client.DiscoveryV1Api(self._api)
        core = client.CoreV1Api(self._api)
        slice_selector = f"{CLUSTER_LABEL}={self.cluster},{ROLE_LABEL} in (prefill,decode)"
        pod_selector = f"{CLUSTER_LABEL}={self.cluster}"
        self._tasks = [
            asyncio.create_task(
                self._list_watch(
                    "slices", discovery_api.list_namespaced_endpoint_slice, slice_selector, self.slices
                ),
                name="ucm-router-watch-endpointslices",
            ),
            asyncio.create_task(
                self._list_watch("pods", core.list_namespaced_pod, pod_selector, self.pods),
                name="ucm-router-watch-pods",
            ),
        ]
        waits = [asyncio.create_task(e.wait()) for e in self._synced.values()]
        _done, pending = await asyncio.wait(waits, timeout=self.sync_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "Kubernetes discovery not synced after %.0fs; serving as it syncs", self.sync_timeout_s
            )
        log.info(
            "discovering ucm.dev/cluster=%s in namespace %s: %d endpoint(s)",
            self.cluster,
            self.namespace,
            len(registry.states()),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._api is not None:
            await self._api.close()
            self._api = None

    def _publish(self) -> None:
        if self._registry is not None:
            self._registry.set_endpoints(build_endpoints(self.slices, self.pods, self.default_port))

    async def _list_watch(
        self,
        kind: str,
        list_fn: Callable[..., Awaitable[Any]],
        selector: str,
        store: dict[str, dict[str, Any]],
    ) -> None:
        backoff = 0.5
        while True:
            try:
                listing = await list_fn(self.namespace, label_selector=selector, _preload_content=False)
                raw = await listing.json()
                store.clear()
                for item in raw.get("items") or []:
                    store[item["metadata"]["name"]] = item
                self._publish()
                self._synced[kind].set()
                version = raw["metadata"]["resourceVersion"]
                while True:
                    stream = watch.Watch().stream(
                        list_fn,
                        self.namespace,
                        label_selector=selector,
                        resource_version=version,
                        timeout_seconds=_WATCH_SECONDS,
                        allow_watch_bookmarks=True,
                    )
                    async with stream:
                        async for event in stream:
                            obj = event["raw_object"]
                            version = obj["metadata"].get("resourceVersion", version)
                            if event["type"] == "BOOKMARK":
                                continue
                            name = obj["metadata"]["name"]
                            if event["type"] == "DELETED":
                                store.pop(name, None)
                            else:
                                store[name] = obj
                            self._publish()
                    backoff = 0.5
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("watching %s failed (HTTP %s); relisting in %.1fs", kind, exc.status, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
            except Exception as exc:
                log.warning("watching %s failed (%r); relisting in %.1fs", kind, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
