"""Invalid UCMClusters generated per class of mistake (issue 21), for the admission e2e test.

Each case is the heterogeneous example with one mistake, built by crossing a pool (or the
router, or the engine) with a subject and a family of bad values, so a class is a product of
small generators, not a hand-written list. Each says which field the refusal must name — the
user's own field, never a path inside a Deployment. A case may be refused by the API server
already (the CRD's schema), or admitted and then reported `Valid=False` by the operator; both
are "refused up front", and the test accepts either as long as the field is named.

Classes:
- `k8s`: pass-through Kubernetes fields (resources, nodeSelector, tolerations, affinity, env,
  the store's mount) with values core/v1 refuses;
- `vllm`: owned or PD-incompatible vLLM flags in the spellings vLLM accepts;
- `facts`: what only the live cluster knows (GPUs of the nodes a pool can reach, an existing
  claim's size and access modes, mount paths the pod already has).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from e2e.operator_support import load_example

JSON = dict[str, Any]
Mutation = Callable[[JSON], None]
Generated = tuple[str, str, Mutation] | tuple[str, str, Mutation, tuple[JSON, ...]]
POOLS = (("prefill", 0), ("decode", 0))


@dataclasses.dataclass(frozen=True)
class Case:
    cls: str
    name: str
    field: str          # what the refusal must name
    mutate: Mutation
    what: str           # one line for failure messages
    needs: tuple[JSON, ...] = ()   # objects to create in the namespace first (claims)

    def body(self, namespace: str) -> JSON:
        body = load_example("ucmcluster-heterogeneous.yaml", name=self.name, namespace=namespace)
        body = copy.deepcopy(body)
        self.mutate(body["spec"])
        return body


def _pool(spec: JSON, role: str, index: int) -> JSON:
    pool: JSON = spec[role][index]
    return pool


# --- class 1: pass-through Kubernetes fields -------------------------------------------------

NEGATIVE = ("-1", "-0.5", "-100m", "-2Gi")
RESOURCES = ("cpu", "memory", "ephemeral-storage")
BAD_LABEL_KEYS = ("bad key", "-starts-with-dash", "a/b/c", "UPPER_/x", "x" * 64, "ends.")
BAD_LABEL_VALUES = ("-dash", "has space", "trailing_", "a/b")


def _set_resources(role: str, index: int, resources: JSON) -> Mutation:
    return lambda spec: _pool(spec, role, index).__setitem__("resources", resources)


def k8s_cases() -> Iterator[Generated]:
    for (role, i), res, value in itertools.product(POOLS, RESOURCES, NEGATIVE):
        yield (f"spec.{role}[{i}].resources.requests.{res}", f"{role} {res} request {value}",
               _set_resources(role, i, {"requests": {res: value}}))
    for (role, i), res in itertools.product(POOLS, ("cpu", "memory")):
        low, high = ("1", "2") if res == "cpu" else ("1Gi", "2Gi")
        yield (f"spec.{role}[{i}].resources.requests", f"{role} {res} limit below request",
               _set_resources(role, i, {"requests": {res: high}, "limits": {res: low}}))
    for res, value in itertools.product(("cpu", "memory"), NEGATIVE[:2]):
        yield (f"spec.router.resources.limits.{res}", f"router {res} limit {value}",
               lambda spec, res=res, value=value: spec["router"].__setitem__("resources", {"limits": {res: value}}))
    for (role, i), key in itertools.product(POOLS, BAD_LABEL_KEYS):
        yield (f"spec.{role}[{i}].nodeSelector", f"{role} nodeSelector key {key!r}",
               lambda spec, role=role, i=i, key=key: _pool(spec, role, i).__setitem__("nodeSelector", {key: "v"}))
    for (role, i), value in itertools.product(POOLS, BAD_LABEL_VALUES):
        yield (f"spec.{role}[{i}].nodeSelector", f"{role} nodeSelector value {value!r}",
               lambda spec, role=role, i=i, value=value: _pool(spec, role, i).__setitem__("nodeSelector", {"zone": value}))
    tolerations: tuple[JSON, ...] = (
        {"key": "a", "operator": "Exists", "value": "v"},          # Exists takes no value
        {"key": "", "operator": "Equal", "value": "v"},             # an empty key needs Exists
        {"key": "a", "operator": "Equal", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 5},
        {"key": "bad key", "operator": "Exists"},                    # not a label name
        {"key": "a", "operator": "Equal", "value": "-bad-"},         # not a label value
    )
    for (role, i), tol in itertools.product(POOLS, tolerations):
        yield (f"spec.{role}[{i}].tolerations[0]", f"{role} toleration {tol}",
               lambda spec, role=role, i=i, tol=tol: _pool(spec, role, i).__setitem__("tolerations", [tol]))
    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    affinities: tuple[JSON, ...] = (
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]}]}}},
        {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "preference": term}]}},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]},
                          "unknownField": True}},
        {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"a": "b"}}}]}},
        {"nodeAffinity": "anywhere"},
    )
    for (role, i), affinity in itertools.product(POOLS, affinities):
        yield (f"spec.{role}[{i}].affinity", f"{role} affinity {affinity}",
               lambda spec, role=role, i=i, aff=affinity: _pool(spec, role, i).__setitem__("affinity", aff))
    sources: tuple[JSON, ...] = (
        {"secretKeyRef": {"name": "s"}},
        {"configMapKeyRef": {"key": "k"}},
        {"fieldRef": {"fieldPath": "spec.nothing"}},
        {"secretKeyRef": {"name": "s", "key": "k"}, "configMapKeyRef": {"name": "c", "key": "k"}},
        {"resourceFieldRef": {"resource": "gpus"}},
        {"secretKeyRef": {"name": "s", "key": "k", "unknownField": 1}},
    )
    for source in sources:
        yield ("spec.engine.env[0]", f"env valueFrom {source}",
               lambda spec, source=source: spec["engine"].__setitem__("env", [{"name": "X", "valueFrom": source}]))
    for path in ("/etc/ucm", "/dev/shm"):
        yield ("spec.store.mountPath", f"store mounted over {path}",
               lambda spec, path=path: spec["store"].__setitem__("mountPath", path))


GENERATORS: dict[str, Callable[[], Iterator[Generated]]] = {
    "k8s": k8s_cases,
}


def cases(classes: tuple[str, ...] | None = None) -> list[Case]:
    found = []
    for cls, generate in GENERATORS.items():
        if classes is not None and cls not in classes:
            continue
        for n, generated in enumerate(generate()):
            field, what, mutate, *needs = generated
            found.append(Case(cls, f"adm-{cls}-{n:03d}", field, mutate, what, tuple(needs[0]) if needs else ()))
    return found
