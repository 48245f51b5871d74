"""Helpers for the operator's end-to-end tests: install the CRD, run `ucm-operator run` as a
subprocess under exactly the RBAC rules of charts/ucm/files/operator-rbac.yaml (a ServiceAccount
token, not the admin certificate), and wait for UCMCluster conditions.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from ucm_operator.kube import Kube

from e2e.access import ClusterAccess
from e2e.processes import Stopped, stop_group
from e2e.wait import WaitTimeout, wait_for

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "crds" / "ucm.dev_ucmclusters.yaml"
CRD_DIR = ROOT / "crds"
RBAC_PATH = ROOT / "charts" / "ucm" / "files" / "operator-rbac.yaml"
EXAMPLES = ROOT / "examples"
OPERATOR_BIN = Path(sys.executable).parent / "ucm-operator"
API = "ucm.dev/v1alpha1"


def install_crd(cluster: ClusterAccess) -> None:
    """Apply the CRDs (UCMCluster and UCMPool; server-side, idempotent) and wait until they are
    Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/ucmclusters.ucm.dev",
                    "crd/ucmpools.ucm.dev")


def operator_kubeconfig(cluster: ClusterAccess, namespace: str, path: Path) -> Path:
    """A kubeconfig for a ServiceAccount bound to a Role made from the operator's rules file, and
    to a ClusterRole made from its cluster-scoped rules (named after the namespace, so tests in
    other namespaces keep their own)."""
    doc = yaml.safe_load(RBAC_PATH.read_text())
    rules, cluster_rules = doc["rules"], doc.get("clusterRules") or []
    cluster_name = f"ucm-operator-{namespace}"
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ucm-operator", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "ucm-operator", "namespace": namespace}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "ucm-operator", "namespace": namespace},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ucm-operator"},
         "subjects": [{"kind": "ServiceAccount", "name": "ucm-operator", "namespace": namespace}]},
    ]
    if cluster_rules:
        docs += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": cluster_name}, "rules": cluster_rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": cluster_name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
             "subjects": [{"kind": "ServiceAccount", "name": "ucm-operator", "namespace": namespace}]},
        ]
    manifest = path.with_suffix(".rbac.yaml")
    manifest.write_text(yaml.safe_dump_all(docs))
    cluster.kubectl("apply", "-f", str(manifest))
    token = cluster.kubectl("create", "token", "ucm-operator", "-n", namespace, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": "ucm-operator", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "ucm-operator", "namespace": namespace}}],
        "current-context": "e2e",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """`ucm-operator run --namespace NS` in a subprocess; its log goes to a file the tests read."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, *, resync_seconds: float = 2.0,
                 env: Mapping[str, str] | None = None, extra_args: Sequence[str] = ()) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.resync_seconds = resync_seconds
        self.extra_env = dict(env or {})
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", **self.extra_env}
        env.pop("UCM_WATCH_NAMESPACE", None)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            self.proc = subprocess.Popen(
                [str(OPERATOR_BIN), "run", "--namespace", self.namespace, "--resync-seconds", str(self.resync_seconds),
                 *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def stop(self, grace_s: float = 20.0) -> Stopped:
        """SIGTERM, as the kubelet sends it; the report goes into the log, which failures print."""
        assert self.proc is not None
        stopped = stop_group(self.proc, grace_s)
        with self.log_path.open("a") as log:
            log.write(f"--- stop {time.strftime('%H:%M:%S')}: {stopped.describe()}\n")
        return stopped

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines_since(self, marker: int) -> list[str]:
        return self.log()[marker:].splitlines()

    def wait_resyncs(self, count: int, since: int, timeout: float = 30.0) -> None:
        """Wait until `count` resyncs were logged after log offset `since`."""
        wait_for(lambda: sum("resync #" in line for line in self.lines_since(since)) >= count,
                 f"{count} resyncs of the operator", timeout_s=timeout)


@contextmanager
def running_operator(cluster: ClusterAccess, namespace: str, tmp_path: Path, **kwargs: Any) -> Iterator[OperatorProcess]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    kubeconfig = operator_kubeconfig(cluster, namespace, tmp_path / "operator.kubeconfig")
    operator = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log", **kwargs).start()
    try:
        yield operator
    finally:
        operator.stop()
        # The namespace's deletion removes the Role, not the cluster-scoped binding for nodes.
        cluster.kubectl("delete", "--ignore-not-found", "clusterrolebinding,clusterrole", f"ucm-operator-{namespace}",
                        check=False)
        assert_no_rbac_denials(operator.log())


# The authorizer's words for a denial. A 403 without them is no RBAC matter: e.g. a create in a
# namespace being deleted (NamespaceTerminating), which an all-namespaces operator may still see.
RBAC_DENIAL = re.compile(r'forbidden: User "[^"]+" cannot [^\n]*')


def assert_no_rbac_denials(log: str) -> None:
    denials = RBAC_DENIAL.findall(log)
    assert not denials, f"RBAC denied the operator something: {denials}\n{log[-4000:]}"


# --- reading UCMClusters ---------------------------------------------------------------------


def get_cluster(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = kube.get(API, "UCMCluster", namespace, name)
    return found


def condition(body: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((body or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def wait_condition(kube: Kube, namespace: str, name: str, type_: str, status: str = "True",
                   timeout: float = 60.0, extra: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = get_cluster(kube, namespace, name)
        if (body and condition(body, type_).get("status") == status
                and (body["status"].get("observedGeneration") == body["metadata"]["generation"])
                and (extra is None or extra(body))):
            return body
        return None
    try:
        found: dict[str, Any] = wait_for(check, f"{name}: {type_}={status}", timeout_s=timeout)
    except WaitTimeout as exc:
        body = get_cluster(kube, namespace, name)
        raise AssertionError(f"{exc}\nstatus: {json.dumps((body or {}).get('status'), indent=1)}") from None
    return found


def apply_cluster(cluster: ClusterAccess, namespace: str, body: Mapping[str, Any],
                  check: bool = True) -> subprocess.CompletedProcess[str]:
    """kubectl apply (strict field validation, as a user would) of one UCMCluster."""
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(dict(body)), check=check)


def load_example(file_name: str, /, **metadata: Any) -> dict[str, Any]:
    """An example from examples/, with metadata fields (name, namespace) replaced."""
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / file_name).read_text())
    body["metadata"].update(metadata)
    return body


def children(kube: Kube, namespace: str, name: str, kind: str, api_version: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kube.list(api_version, kind, namespace, f"ucm.dev/cluster={name}")
    return items


def node_products(kube: Kube) -> dict[str, str]:
    nodes = kube.request("GET", "/api/v1/nodes")["items"]
    return {n["metadata"]["name"]: (n["metadata"].get("labels") or {}).get("nvidia.com/gpu.product", "")
            for n in nodes}


def printer_columns(cluster: ClusterAccess, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get ucmc NAME` as {column: value}, cut at the header's column starts (an empty
    column, e.g. Store-Used before any worker reported, is "")."""
    header, row = cluster.kubectl("get", "ucmc", name, "-n", namespace).stdout.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)] + [None]
    return {header[a:b].strip(): row[a:b].strip() for a, b in itertools.pairwise(starts)}
