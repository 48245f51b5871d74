"""The Helm chart, rendered by the real helm binary (no cluster needed).

What a user would otherwise find out only at install time: lint warnings, a value the schema
should refuse, RBAC that grants more (or other) than the operator's rules file, a chart CRD that
drifted from crds/, a Deployment that runs as root or ignores the watch-namespace setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.binaries import bin_dir

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "ucm"
RULES_FILE = CHART / "files" / "operator-rbac.yaml"
RELEASE, NAMESPACE = "ucm", "ucm-system"
# kopf's liveness endpoint and the operator's metrics, on every install
SERVING_ARGS = ["--liveness", "http://0.0.0.0:8080/healthz", "--metrics-address", "0.0.0.0:8081",
                "--store-scrape-seconds", "30"]


@pytest.fixture(scope="module")
def helm() -> Path:
    path = bin_dir() / "helm"
    if not os.access(path, os.X_OK):
        message = f"helm is not built ({path}); run `make bins`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def render(helm: Path, *settings: str) -> list[dict[str, Any]]:
    """`helm template` with --set/--api-versions flags; the documents it renders."""
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *settings)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def render_error(helm: Path, *settings: str) -> str:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *settings)
    assert result.returncode != 0, f"helm template accepted {settings}"
    return result.stderr


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def file_rules() -> dict[str, list[dict[str, Any]]]:
    doc = yaml.safe_load(RULES_FILE.read_text())
    return {"rules": doc["rules"], "clusterRules": doc.get("clusterRules") or []}


def test_chart_crds_are_identical_to_crds_dir() -> None:
    top = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert top, "crds/ holds no CRD"
    stale = sorted(n for n in top.keys() | chart.keys() if top.get(n) != chart.get(n))
    assert not stale, (
        f"charts/ucm/crds/ differs from crds/ for {stale}; sync with: "
        "rm -f charts/ucm/crds/*.yaml && cp crds/*.yaml charts/ucm/crds/"
    )


def test_helm_lint_is_clean(helm: Path) -> None:
    for settings in ([], ["--set", "watch.allNamespaces=true"]):
        result = run_helm(helm, "lint", "--strict", str(CHART), *settings)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_default_install_is_namespaced_with_exactly_the_rules_file(helm: Path) -> None:
    docs = render(helm)
    kinds = sorted(d["kind"] for d in docs)
    if not file_rules()["clusterRules"]:
        assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds, kinds
    (role,) = by_kind(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == file_rules()["rules"]
    (binding,) = by_kind(docs, "RoleBinding")
    (sa,) = by_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["args"] == ["run", "--namespace", NAMESPACE, *SERVING_ARGS]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert not by_kind(docs, "ServiceMonitor")


def test_rules_have_no_wildcards_and_cover_what_the_operator_writes() -> None:
    rules = file_rules()
    for rule in rules["rules"] + rules["clusterRules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {RULES_FILE.name}: {rule}"
    granted = {(g, r, v) for rule in rules["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert ("ucm.dev", "ucmclusters", "watch") in granted
    assert ("ucm.dev", "ucmclusters/status", "patch") in granted
    assert ("apps", "deployments", "patch") in granted
    assert not any(r == "secrets" for _, r, _ in granted), "the operator must not read Secrets"


def test_watch_all_namespaces_uses_a_cluster_role(helm: Path) -> None:
    docs = render(helm, "--set", "watch.allNamespaces=true")
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    (role,) = by_kind(docs, "ClusterRole")
    assert role["rules"] == file_rules()["rules"] + file_rules()["clusterRules"]
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    # Cluster-scoped names carry the release namespace so installs in two namespaces do not collide.
    assert NAMESPACE in role["metadata"]["name"]
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["args"] == ["run", *SERVING_ARGS]


def test_watch_another_namespace_puts_the_role_there(helm: Path) -> None:
    docs = render(helm, "--set", "watch.namespace=team-a")
    (role,) = by_kind(docs, "Role")
    (binding,) = by_kind(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"
    assert binding["subjects"][0]["namespace"] == NAMESPACE
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["args"] == ["run", "--namespace", "team-a", *SERVING_ARGS]


def test_operator_pod_is_non_root_with_resources(helm: Path) -> None:
    (deploy,) = by_kind(render(helm, "--set", "image.tag=1.2.3", "--set", "extraArgs={--verbose}"), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "ucm-operator:1.2.3"
    assert container["args"][-1] == "--verbose"
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"


def test_existing_service_account_must_be_named(helm: Path) -> None:
    err = render_error(helm, "--set", "serviceAccount.create=false")
    assert "serviceAccount.name is required" in err
    docs = render(helm, "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=platform-ucm")
    assert not by_kind(docs, "ServiceAccount")
    assert by_kind(docs, "RoleBinding")[0]["subjects"][0]["name"] == "platform-ucm"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (["--set", "wacth.allNamespaces=true"], "wacth"),
        (["--set", "watch.allNamespaces=yes"], "allNamespaces"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (["--set", "securityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
        (["--set", "resources.requests.cpu=lots"], "cpu"),
        (["--set", "watch.namespace=Not_A_Namespace"], "namespace"),
        (["--set", "watch.allNamespaces=true", "--set", "watch.namespace=team-a"], "namespace"),
        (["--set", "serviceMonitor.interval=30 seconds"], "interval"),
        (["--set", "tolerations[0].operator=Maybe"], "operator"),
        (["--set", "extraEnv[0].name=A", "--set", "extraEnv[0].value=1"], "value"),
        (["--set", "livenessPort=80"], "livenessPort"),
        # --set turns an all-digit tag into a number; a number is no tag (YAML would float it).
        (["--set", "image.tag=20261128"], "tag"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(helm: Path, settings: list[str], expected: str) -> None:
    err = render_error(helm, *settings)
    assert "values don't meet the specifications of the schema" in err, err
    assert expected in err, err


def test_service_monitor_needs_the_prometheus_operator_api(helm: Path) -> None:
    assert by_kind(render(helm), "ServiceMonitor") == []
    err = render_error(helm, "--set", "serviceMonitor.enabled=true")
    assert "monitoring.coreos.com/v1" in err
    docs = render(helm, "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=prom",
                  "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    monitor = workload_monitor(docs)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    docs = render(helm, "--set", "serviceMonitor.enabled=true", "--set", "watch.allNamespaces=true",
                  "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    assert workload_monitor(docs)["spec"]["namespaceSelector"] == {"any": True}


def workload_monitor(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (monitor,) = [m for m in by_kind(docs, "ServiceMonitor") if m["metadata"]["name"].endswith("-workloads")]
    return monitor


def test_the_operator_serves_its_own_metrics_to_a_service_monitor(helm: Path) -> None:
    docs = render(helm, "--set", "serviceMonitor.enabled=true", "--set", "metricsPort=9100",
                  "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    (deploy,) = by_kind(docs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["args"][-4:-2] == ["--metrics-address", "0.0.0.0:9100"]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-operator-metrics")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    (monitor,) = [m for m in by_kind(docs, "ServiceMonitor") if m["metadata"]["name"].endswith("-operator")]
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_grafana_dashboard_is_shipped_verbatim_when_asked_for(helm: Path) -> None:
    assert not by_kind(render(helm), "ConfigMap")
    docs = render(helm, "--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.namespace=monitoring")
    (config_map,) = by_kind(docs, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "files" / "grafana-dashboard.json").read_text()
    assert config_map["data"]["ucm-overview.json"] == shipped.rstrip("\n")
    assert "values don't meet the specifications" in render_error(helm, "--set", "grafanaDashboard.enabel=true")


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector["matchLabels"].items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def test_service_monitor_scrapes_the_services_the_operator_creates(helm: Path) -> None:
    """The monitor's selector and port name must match what `ucm-operator render` produces."""
    monitor = workload_monitor(render(helm, "--set", "serviceMonitor.enabled=true",
                                      "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"))
    example = REPO / "examples" / "ucmcluster-heterogeneous.yaml"
    result = subprocess.run([str(Path(sys.executable).parent / "ucm-operator"), "render", "-f", str(example)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    services = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Service"]
    roles = {s["metadata"]["labels"]["ucm.dev/role"] for s in services
             if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])}
    assert roles == {"prefill", "decode", "router"}
    port = monitor["spec"]["endpoints"][0]["port"]
    for service in services:
        assert port in {p["name"] for p in service["spec"]["ports"]}, service["metadata"]["name"]


def test_rbac_checksum_rolls_the_operator_when_rules_change(helm: Path) -> None:
    (deploy,) = by_kind(render(helm), "Deployment")
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/rbac"]) == 64


def test_default_child_images_reach_the_operator(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The env the chart sets is what the operator reads for pods whose UCMCluster names no image."""
    from ucm_operator.constants import router_image_default, worker_image_default

    (deploy,) = by_kind(render(helm, "--set", "workerImage.repository=reg/w", "--set-string", "routerImage.tag=9"),
                        "Deployment")
    env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert worker_image_default() == "reg/w:0.1.0"
    assert router_image_default() == "ucm-router:9"
