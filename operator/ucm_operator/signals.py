"""Where the operator reads what pods report, with no Prometheus server in between: the
autoscaler's load signal from each Ready router pod's endpoint (`GET http://POD_IP:8000/metrics`,
ucm/router/metrics.py), and the store's usage from each Ready worker pod's vLLM /metrics
(store_usage.py). The operator already lists the cluster's pods, so this needs no extra RBAC and
no cluster-wide read, and nothing in the worker or router pods gains a privilege.

An operator that runs outside the cluster network (`make demo`, the e2e tests) cannot reach pod
IPs; `ucm-operator run --router-metrics-url URL` and `--worker-metrics-url URL` name the endpoints
instead (`{namespace}` and `{name}` are replaced by the UCMCluster's).
"""

from __future__ import annotations

import concurrent.futures
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from .constants import LABEL_ROLE, ROLE_DECODE, ROLE_PREFILL, ROLE_ROUTER, ROUTER_PORT, WORKER_PORT
from .status import pod_ready

FETCH_TIMEOUT_S = 2.0


def _pod_urls(pods: Sequence[Mapping[str, Any]], roles: Sequence[str], port: int) -> dict[str, str]:
    """pod name -> /metrics URL, for every Ready pod of these roles that has an IP."""
    urls = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        ip = (pod.get("status") or {}).get("podIP")
        if (meta.get("labels") or {}).get(LABEL_ROLE) in roles and ip and pod_ready(pod):
            host = f"[{ip}]" if ":" in str(ip) else str(ip)
            url = f"http://{host}:{port}/metrics"
            urls[str(meta.get("name") or url)] = url
    return dict(sorted(urls.items()))


def router_metric_urls(namespace: str, name: str, pods: Sequence[Mapping[str, Any]], override: str | None) -> list[str]:
    """The /metrics URL of every Ready router pod of the cluster (or the override)."""
    if override:
        return [override.format(namespace=namespace, name=name)]
    return sorted(_pod_urls(pods, (ROLE_ROUTER,), ROUTER_PORT).values())


def worker_metric_urls(namespace: str, name: str, pods: Sequence[Mapping[str, Any]],
                       overrides: Sequence[str]) -> dict[str, str]:
    """Source name -> /metrics URL of every Ready prefill/decode pod (or of each override URL,
    named by itself)."""
    if overrides:
        return {url: url for url in (o.format(namespace=namespace, name=name) for o in overrides)}
    return _pod_urls(pods, (ROLE_PREFILL, ROLE_DECODE), WORKER_PORT)


def fetch_each(urls: Mapping[str, str], timeout: float = FETCH_TIMEOUT_S) -> tuple[dict[str, str], dict[str, str]]:
    """Every source's body, fetched in parallel (a pass waits one timeout at most, however many
    pods), and the error of each that failed - a worker that does not answer is reported, not fatal."""
    bodies: dict[str, str] = {}
    errors: dict[str, str] = {}
    if not urls:
        return bodies, errors

    def get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8", errors="replace"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        futures = {source: pool.submit(get, url) for source, url in urls.items()}
        for source, future in futures.items():
            try:
                bodies[source] = future.result()
            except (OSError, ValueError) as exc:
                errors[source] = f"{urls[source]}: {exc}"
    return bodies, errors


def fetch_texts(urls: Sequence[str], timeout: float = FETCH_TIMEOUT_S) -> list[str]:
    """Each URL's body; any failure raises OSError naming the URL (a partial read would make the
    cluster look less loaded than it is)."""
    texts = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                texts.append(response.read().decode("utf-8", errors="replace"))
        except OSError as exc:
            raise OSError(f"{url}: {exc}") from exc
    return texts
