"""pytest fixtures for end-to-end tests against the local control plane (e2e/cluster.py).

- `cluster` (session): a running cluster (kubeconfig, server, bin_dir, kubectl(), helm()).
  Started once per test session and stopped at its end; set UCM_E2E_KUBECONFIG to the
  kubeconfig of a cluster from `make cluster-up` to reuse that one instead (seconds saved per
  run while iterating).
- `k8s_api` (session): a `kubernetes.client.ApiClient` for that cluster.
- `namespace` (function): a fresh namespace, with its default ServiceAccount already created (so
  pods are admitted at once), deleted after the test.

A test that uses any of them is an e2e test and gets the `e2e` mark even if it forgot it, so
`pytest -m "not e2e"` never starts a cluster. Simulated pod and node IPs are fake addresses that
exist only in API objects: never send traffic to them.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from e2e.access import ClusterAccess
from e2e.cluster import LocalCluster
from e2e.wait import wait_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLUSTER_FIXTURES = {"cluster", "k8s_api", "namespace"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterAccess]:
    existing = os.environ.get("UCM_E2E_KUBECONFIG")
    if existing:
        yield ClusterAccess.from_kubeconfig(Path(existing))
        return
    local = LocalCluster()
    local.start()
    try:
        yield local
    finally:
        # Keep the component logs (their paths are printed) when any test failed: the
        # control plane's side of a failure is often in them.
        local.stop(failed=request.session.testsfailed > 0)


@pytest.fixture(scope="session")
def k8s_api(cluster: ClusterAccess) -> Iterator[client.ApiClient]:
    api: client.ApiClient = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    try:
        yield api
    finally:
        api.close()  # type: ignore[no-untyped-call]


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"e2e-{stem}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(k8s_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    core = client.CoreV1Api(k8s_api)
    name = _namespace_name(request.node.name)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"ucm.dev/e2e": "true"})))
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        f"ServiceAccount {name}/default",
        timeout_s=30,
        interval_s=0.05,
    )
    try:
        yield name
    finally:
        # Not waited for: the namespace controller removes the contents in the background.
        core.delete_namespace(name, propagation_policy="Background")


# --- shared by the operator's e2e modules -----------------------------------------------------


@pytest.fixture(scope="module")
def crd(cluster: ClusterAccess) -> None:
    """The UCMCluster CRD, installed (and Established) once per module."""
    from e2e.operator_support import install_crd

    install_crd(cluster)


@pytest.fixture
def kube(k8s_api: client.ApiClient) -> Any:
    """The operator's own API wrapper over the session client."""
    from ucm_operator.kube import Kube

    return Kube(k8s_api)
