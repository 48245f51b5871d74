"""The Helm chart against the real local control plane.

- install: the CRD becomes Established, the operator Deployment Available (kwok plays the
  kubelet on the CPU-only node);
- upgrade: a changed value reaches the Deployment; switching to all-namespaces swaps the Role for
  a ClusterRole; uninstall removes what the chart created and keeps the CRD (Helm's crds/ rule);
- RBAC is enough: the real operator, authenticated as the chart's ServiceAccount, reconciles the
  heterogeneous example to Serving with no Forbidden in its log;
- RBAC is not more: the API server's own view of what that identity may do (a
  SelfSubjectRulesReview) is exactly the rules file plus what every authenticated user gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.access import ClusterAccess
from e2e.operator_support import assert_no_rbac_denials
from e2e.processes import stop_group
from e2e.ucm_demo.identity import service_account_user, write_service_account_kubeconfig
from e2e.ucm_demo.view import is_serving

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "ucm"
RULES = yaml.safe_load((CHART / "files" / "operator-rbac.yaml").read_text())
EXAMPLE = REPO / "examples" / "ucmcluster-heterogeneous.yaml"
RELEASE = "ucm"
SA = "ucm-operator"  # <fullname>-operator for release "ucm"
# What every authenticated identity may do (system:basic-user and friends): not the chart's doing.
DEFAULT_GROUPS = {"authorization.k8s.io", "authentication.k8s.io"}


def kubectl_json(cluster: Any, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def wait_for(what: str, predicate: Any, timeout: float = 90.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def condition(obj: dict[str, Any], kind: str) -> str | None:
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond["type"] == kind:
            return str(cond["status"])
    return None


def helm_install(cluster: Any, namespace: str, *settings: str, action: str = "install") -> str:
    return str(cluster.helm(action, RELEASE, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s",
                            *settings).stdout)


def exists(cluster: Any, *args: str) -> bool:
    return bool(cluster.kubectl("get", *args, check=False).returncode == 0)


@pytest.fixture
def uninstall_after(cluster: Any, namespace: str) -> Iterator[None]:
    """A failed test must not leave the release's ClusterRole behind in the shared cluster (the
    namespace's deletion removes only namespaced objects)."""
    yield
    cluster.helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "60s", check=False)


@pytest.mark.usefixtures("uninstall_after")
def test_install_upgrade_uninstall(cluster: Any, namespace: str) -> None:
    notes = helm_install(cluster, namespace)
    # NOTES.txt tells the user how to check the operator and where to apply a UCMCluster.
    assert f"kubectl -n {namespace} rollout status deployment/{RELEASE}-operator" in notes, notes
    assert f"kubectl -n {namespace} apply -f examples/ucmcluster-heterogeneous.yaml" in notes, notes
    crd = kubectl_json(cluster, "get", "crd", "ucmclusters.ucm.dev")
    assert condition(crd, "Established") == "True"
    deploy = kubectl_json(cluster, "-n", namespace, "get", "deployment", f"{RELEASE}-operator")
    assert condition(deploy, "Available") == "True"
    pods = kubectl_json(cluster, "-n", namespace, "get", "pods", "-l", "app.kubernetes.io/component=operator")["items"]
    (pod,) = pods
    node = kubectl_json(cluster, "get", "node", pod["spec"]["nodeName"])
    assert "nvidia.com/gpu.product" not in node["metadata"]["labels"], "the operator pod belongs on a CPU node"
    assert condition(pod, "Ready") == "True"
    assert exists(cluster, "-n", namespace, "role", f"{RELEASE}-operator")

    # A changed value rolls out; --wait returns once the new pod is Available.
    helm_install(cluster, namespace, "--set", "resources.limits.memory=512Mi", action="upgrade")
    deploy = kubectl_json(cluster, "-n", namespace, "get", "deployment", f"{RELEASE}-operator")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert condition(deploy, "Available") == "True"

    # Watching all namespaces: the Role goes, a ClusterRole comes, --namespace leaves the args.
    helm_install(cluster, namespace, "--set", "watch.allNamespaces=true", action="upgrade")
    cluster_role = f"{RELEASE}-operator-{namespace}"
    assert exists(cluster, "clusterrole", cluster_role) and exists(cluster, "clusterrolebinding", cluster_role)
    assert not exists(cluster, "-n", namespace, "role", f"{RELEASE}-operator")
    deploy = kubectl_json(cluster, "-n", namespace, "get", "deployment", f"{RELEASE}-operator")
    assert "--namespace" not in deploy["spec"]["template"]["spec"]["containers"][0]["args"]

    cluster.helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "60s")
    for args in (("-n", namespace, "deployment", f"{RELEASE}-operator"), ("-n", namespace, "serviceaccount", SA),
                 ("clusterrole", cluster_role), ("clusterrolebinding", cluster_role)):
        assert not exists(cluster, *args), f"{args} survived helm uninstall"
    assert exists(cluster, "crd", "ucmclusters.ucm.dev"), "Helm keeps CRDs from crds/ on uninstall"


def _rules_review(identity: ClusterAccess, namespace: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the API server says `identity` may use in namespace."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
              "spec": {"namespace": namespace}}
    # --validate=false: client-side validation would list CRDs, which this identity may not.
    result = identity.kubectl("create", "--validate=false", "-f", "-", "-o", "json", input=json.dumps(review))
    granted = set()
    for rule in json.loads(result.stdout)["status"]["resourceRules"]:
        for group in rule.get("apiGroups", [""]):
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    return granted


def _file_rules(key: str | None = None) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of the rules file: both lists, or only `rules`/`clusterRules`."""
    lists = [key] if key else ["rules", "clusterRules"]
    return {(g, r, v) for name in lists for rule in RULES.get(name) or [] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def test_chart_rbac_is_enough_and_not_more(cluster: Any, namespace: str, tmp_path: Path) -> None:
    helm_install(cluster, namespace)
    kubeconfig = tmp_path / "operator.kubeconfig"
    identity = write_service_account_kubeconfig(cluster, namespace, SA, kubeconfig)

    # Not more: exactly the rules file in the watched namespace, nothing anywhere else.
    granted = {g for g in _rules_review(identity, namespace) if g[0] not in DEFAULT_GROUPS}
    assert granted == _file_rules()
    elsewhere = {g for g in _rules_review(identity, "default") if g[0] not in DEFAULT_GROUPS}
    # Elsewhere only the cluster-scoped reads (nodes), which a rules review lists in every namespace.
    assert elsewhere == _file_rules("clusterRules"), (
        f"the namespaced chart grants rights in other namespaces: {sorted(elsewhere - _file_rules('clusterRules'))}")
    user = service_account_user(namespace, SA)
    for verb, resource, ns in (("get", "secrets", namespace), ("update", "ucmclusters.ucm.dev", namespace),
                               ("list", "ucmclusters.ucm.dev", "default"), ("create", "clusterroles", None),
                               ("delete", "nodes", None)):
        args = ["auth", "can-i", verb, resource, f"--as={user}"] + (["-n", ns] if ns else [])
        answer = cluster.kubectl(*args, check=False).stdout.strip()
        assert answer == "no", f"{user} may {verb} {resource} in {ns or 'the cluster'}"

    # Enough: the operator, as that identity, takes the example to Serving.
    _operator_serves_example(cluster, kubeconfig, namespace, ["--namespace", namespace], tmp_path)


def _operator_serves_example(cluster: Any, kubeconfig: Path, namespace: str, args: list[str], tmp_path: Path) -> None:
    """Runs `ucm-operator run ARGS` with `kubeconfig`, applies the example in `namespace`, waits for
    Serving, and fails on any RBAC denial in the operator's log."""
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "ucm-operator"), "run", *args],
                                env=dict(os.environ, KUBECONFIG=str(kubeconfig)), stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        cluster.kubectl("-n", namespace, "apply", "-f", str(EXAMPLE))
        name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]

        def serving() -> bool:
            assert proc.poll() is None, f"operator exited: {log_path.read_text()[-3000:]}"
            return is_serving(kubectl_json(cluster, "-n", namespace, "get", "ucmclusters.ucm.dev", name))

        wait_for("the example UCMCluster to be Serving", serving, timeout=180, interval=1.0)
    finally:
        stop_group(proc, grace_s=20)
    assert_no_rbac_denials(log_path.read_text(errors="replace"))


@pytest.mark.usefixtures("uninstall_after")
def test_all_namespaces_rbac_reconciles_another_namespace(cluster: Any, namespace: str, tmp_path: Path) -> None:
    """watch.allNamespaces=true: the ClusterRole lets the operator (no --namespace) serve a
    UCMCluster in a namespace the chart was not installed in, and grants the same rules there."""
    other = f"{namespace[:50]}-apps"
    helm_install(cluster, namespace, "--set", "watch.allNamespaces=true")
    cluster.kubectl("create", "namespace", other)
    try:
        kubeconfig = tmp_path / "operator.kubeconfig"
        identity = write_service_account_kubeconfig(cluster, namespace, SA, kubeconfig)
        granted = {g for g in _rules_review(identity, other) if g[0] not in DEFAULT_GROUPS}
        assert granted == _file_rules()
        _operator_serves_example(cluster, kubeconfig, other, [], tmp_path)
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
