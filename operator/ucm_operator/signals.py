"""Where the autoscaler reads its load signal: each Ready router pod's own Prometheus endpoint
(`GET http://POD_IP:8000/metrics`, ucm/router/metrics.py), no Prometheus server in between. The
operator already lists the cluster's pods, so this needs no extra RBAC and no cluster-wide read,
and nothing in the worker or router pods gains a privilege.

An operator that runs outside the cluster network (`make demo`, the e2e tests) cannot reach pod
IPs; `ucm-operator run --router-metrics-url URL` names the endpoint instead (`{namespace}` and
`{name}` are replaced by the UCMCluster's).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from .constants import LABEL_ROLE, ROLE_ROUTER, ROUTER_PORT
from .status import pod_ready

FETCH_TIMEOUT_S = 2.0


def router_metric_urls(namespace: str, name: str, pods: Sequence[Mapping[str, Any]], override: str | None) -> list[str]:
    """The /metrics URL of every Ready router pod of the cluster (or the override)."""
    if override:
        return [override.format(namespace=namespace, name=name)]
    urls = []
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        ip = (pod.get("status") or {}).get("podIP")
        if labels.get(LABEL_ROLE) == ROLE_ROUTER and ip and pod_ready(pod):
            host = f"[{ip}]" if ":" in str(ip) else str(ip)
            urls.append(f"http://{host}:{ROUTER_PORT}/metrics")
    return sorted(urls)


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
