"""A corpus of invalid UCMClusters (e2e/invalid_specs/): each is either rejected by the API server
(`kubectl apply` fails naming the field) or accepted and reported by the operator as Valid=False
with the field path, with a Warning event and nothing created. An invalid update of a running
cluster changes nothing that runs.

Each file's header says which: `# expect: rejected` + `# match: TEXT` (in kubectl's error), or
`# expect: invalid` + `# field: PATH` (in the Valid condition's message).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ucm_operator.kube import Kube

from e2e.access import ClusterAccess
from e2e.operator_support import (
    EXAMPLES,
    apply_cluster,
    condition,
    get_cluster,
    load_example,
    running_operator,
    wait_condition,
)
from e2e.wait import wait_for

pytestmark = pytest.mark.e2e
CORPUS = Path(__file__).resolve().parent / "invalid_specs"


def corpus() -> list[tuple[Path, str, str]]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        header = dict(re.findall(r"^# (expect|match|field): (.+)$", path.read_text(), re.MULTILINE))
        cases.append((path, header["expect"], header.get("match") or header["field"]))
    return cases


def cluster_name(path: Path) -> str:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "UCMCluster"]
    return str(docs[0]["metadata"]["name"])


def test_corpus_is_big_enough() -> None:
    kinds = [expect for _, expect, _ in corpus()]
    assert len(kinds) >= 20 and kinds.count("rejected") >= 10 and kinds.count("invalid") >= 5


def test_api_server_rejects_with_the_field_named(cluster: ClusterAccess, namespace: str, crd: None) -> None:
    failures = []
    for path, expect, match in corpus():
        if expect != "rejected":
            continue
        result = cluster.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
        if result.returncode == 0 or match not in result.stderr:
            failures.append(f"{path.name}: rc={result.returncode} stderr={result.stderr.strip()!r}")
    assert failures == []
    assert cluster.kubectl("get", "ucmc", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_api_server_accepts_every_example(cluster: ClusterAccess, namespace: str, crd: None) -> None:
    """The counterpart: what examples/ shows users (spec.sparse included) passes the same checks."""
    for path in sorted(EXAMPLES.glob("*.yaml")):
        result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
        assert result.returncode == 0, f"{path.name}: {result.stderr.strip()}"


def test_operator_reports_valid_false_and_creates_nothing(cluster: ClusterAccess, namespace: str, kube: Kube,
                                                          crd: None, tmp_path: Path) -> None:
    cases = [(path, field) for path, expect, field in corpus() if expect == "invalid"]
    with running_operator(cluster, namespace, tmp_path):
        for path, _ in cases:
            cluster.kubectl("apply", "-n", namespace, "-f", str(path))
        for path, field in cases:
            name = cluster_name(path)
            body = wait_condition(kube, namespace, name, "Valid", "False", timeout=60)
            valid = condition(body, "Valid")
            assert field in valid["message"], (path.name, valid)
            assert condition(body, "Degraded")["reason"] == "InvalidSpec"
            assert condition(body, "Serving")["status"] == "False"
            events = kube.list("v1", "Event", namespace)
            assert any(e["involvedObject"].get("name") == name and e["type"] == "Warning"
                       and e["reason"] == "InvalidSpec" and field in e["message"] for e in events), path.name
            created = [kind for api_version, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"))
                       if kube.list(api_version, kind, namespace, f"ucm.dev/cluster={name}")]
            assert created == [], (path.name, created)


def test_invalid_update_changes_nothing_that_runs(cluster: ClusterAccess, namespace: str, kube: Kube,
                                                  crd: None, tmp_path: Path) -> None:
    name = "llama-pd"
    body = load_example("ucmcluster-heterogeneous.yaml", namespace=namespace)
    with running_operator(cluster, namespace, tmp_path):
        apply_cluster(cluster, namespace, body)
        before = wait_condition(kube, namespace, name, "Serving", timeout=120,
                                extra=lambda b: condition(b, "Progressing")["status"] == "False")

        def snapshot() -> dict[str, Any]:
            return {d["metadata"]["name"]: (d["metadata"]["generation"], d["metadata"]["annotations"])
                    for d in kube.list("apps/v1", "Deployment", namespace, f"ucm.dev/cluster={name}")}
        running = snapshot()

        body["spec"]["prefill"][0]["extraArgs"] = ["--kv-cache-dtype", "fp8"]   # incompatible with decode
        body["spec"]["decode"][0]["replicas"] = 3                                # must not be applied either
        apply_cluster(cluster, namespace, body)
        after = wait_condition(kube, namespace, name, "Valid", "False", timeout=60)
        assert "spec.prefill[0].extraArgs" in condition(after, "Valid")["message"]
        assert condition(after, "Serving")["status"] == "True"           # the old pods keep serving
        assert after["status"]["revision"] == before["status"]["revision"]
        assert snapshot() == running

        del body["spec"]["prefill"][0]["extraArgs"]                       # fixed: now it is applied
        apply_cluster(cluster, namespace, body)
        wait_condition(kube, namespace, name, "Serving", timeout=60,
                       extra=lambda b: condition(b, "Valid")["status"] == "True" and b["status"]["decode"] == "3/3")
        assert get_cluster(kube, namespace, name) is not None
        wait_for(lambda: snapshot()[f"{name}-l40s"][0] > running[f"{name}-l40s"][0], "decode pool scaled")
