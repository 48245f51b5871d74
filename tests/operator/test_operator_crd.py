"""The CRD, the examples, the RBAC rules file and the code agree with each other."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from operator_helpers import CRD_PATH, EXAMPLES, RBAC_PATH
from ucm_operator.constants import GROUP, KIND, PLURAL, POOL_PLURAL, VERSION
from ucm_operator.kube import CHILD_KINDS, RESOURCES


def crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return doc


def schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 structural schema -> JSON Schema (drop x-kubernetes-*; int-or-string)."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("pattern", None)
    for bound in ("Minimum", "Maximum"):  # OpenAPI 3.0's boolean form -> draft 7's number form
        if node.get(f"exclusive{bound}") is True:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def test_names() -> None:
    doc = crd()
    assert doc["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert doc["spec"]["names"]["kind"] == KIND and doc["spec"]["names"]["shortNames"] == ["ucmc"]
    (version,) = doc["spec"]["versions"]
    assert version["name"] == VERSION and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Serving": '.status.conditions[?(@.type=="Serving")].status', "Prefill": ".status.prefill",
                       "Decode": ".status.decode", "Revision": ".status.revision",
                       "Store-Used": ".status.store.usedPercent", "Hit-Rate": ".status.store.hitRate",
                       "Age": ".metadata.creationTimestamp"}


def test_examples_match_the_schema() -> None:
    validator = jsonschema.Draft7Validator(to_jsonschema(schema()))
    for path in sorted(EXAMPLES.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(body)]
        assert errors == [], path.name


@pytest.mark.parametrize(("mutate", "where"), [
    (lambda s: s["engine"].update(blocksize=16), "engine"),           # typo: unknown field
    (lambda s: s["engine"].update(dtype="fp8"), "engine/dtype"),
    (lambda s: s["prefill"][0].update(tensorParallelSize=3), "prefill/0/tensorParallelSize"),
    (lambda s: s["decode"][0].update(name="L40S_pool"), "decode/0/name"),
    (lambda s: s["router"].update(policy="random"), "router/policy"),
    (lambda s: s.update(sparse={"keepRatio": 0}), "sparse/keepRatio"),            # keeps nothing
    (lambda s: s.update(sparse={"keepRatio": 1.5}), "sparse/keepRatio"),
    (lambda s: s.update(sparse={"summary": "max"}), "sparse/summary"),
])
def test_schema_rejects(mutate: Any, where: str) -> None:
    body = yaml.safe_load((EXAMPLES / "ucmcluster-heterogeneous.yaml").read_text())
    mutate(body["spec"])
    validator = jsonschema.Draft7Validator(to_jsonschema(schema()))
    paths = ["/".join(map(str, e.path)) for e in validator.iter_errors(body)]
    assert f"spec/{where}" in paths, paths


def test_status_schema_covers_what_the_operator_writes() -> None:
    from operator_helpers import load_example
    from ucm_operator.meta import revision
    from ucm_operator.spec import parse_cluster
    from ucm_operator.status import Observed, compute_status

    spec = parse_cluster(load_example())
    status = compute_status(Observed(spec=spec, generation=1, revision=revision(spec)), None)
    status_schema = to_jsonschema(copy.deepcopy(schema()["properties"]["status"]))
    jsonschema.Draft7Validator(status_schema).validate(status)


def rbac_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RBAC_PATH.read_text())
    # Cluster-wide, the operator may only read nodes (their GPUs, labels and taints).
    assert doc.get("clusterRules") == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    rules: list[dict[str, Any]] = doc["rules"] + doc["clusterRules"]
    return rules


def allowed(group: str, resource: str) -> set[str]:
    return {verb for rule in rbac_rules() if group in rule["apiGroups"] and resource in rule["resources"]
            for verb in rule["verbs"]}


def test_rbac_has_no_wildcards() -> None:
    for rule in rbac_rules():
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule


def test_rbac_covers_exactly_what_the_operator_does() -> None:
    for api_version, kind in CHILD_KINDS:
        group = api_version.rpartition("/")[0]
        # SSA is PATCH (create when new), prune is DELETE, status needs list+watch.
        assert allowed(group, RESOURCES[(api_version, kind)]) == {"get", "list", "watch", "create", "patch", "delete"}, kind
    assert allowed("", "pods") == {"get", "list", "watch"}
    assert allowed("", "nodes") == {"get", "list", "watch"}
    assert allowed("discovery.k8s.io", "endpointslices") == {"get", "list", "watch"}  # granted on to routers
    assert allowed(GROUP, PLURAL) == {"get", "list", "watch"}
    assert allowed(GROUP, f"{PLURAL}/status") == {"get", "patch"}
    assert allowed(GROUP, f"{POOL_PLURAL}/status") == {"get", "patch"}
    assert allowed(GROUP, f"{POOL_PLURAL}/scale") == {"patch"}  # the autoscaler's writes (spec.autoscaling)
    assert allowed("", "events") == {"create"}
    covered = {(g, r) for rule in rbac_rules() for g in rule["apiGroups"] for r in rule["resources"]}
    expected = {(k[0].rpartition("/")[0], RESOURCES[k]) for k in RESOURCES} | {
        (GROUP, f"{PLURAL}/status"), (GROUP, f"{POOL_PLURAL}/status"), (GROUP, f"{POOL_PLURAL}/scale"),
        ("discovery.k8s.io", "endpointslices")}
    assert covered == expected
