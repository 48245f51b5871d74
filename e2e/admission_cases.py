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

from ucm_operator.vllm_flags import OPTIONS

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


# --- class 2: vLLM arguments in the spellings vLLM accepts --------------------------------

OWNED_VALUES = {"model": "org/m", "served_model_name": "x", "revision": "v2", "host": "127.0.0.1", "port": "9000",
                "block_size": "32", "dtype": "float16", "max_model_len": "4096", "tensor_parallel_size": "2",
                "data_parallel_size": "2", "kv_transfer_config": '{"kv_connector":"X","kv_role":"kv_both"}'}
KV_VALUES = {"kv_cache_dtype": "fp8", "quantization": "awq", "tokenizer": "org/other", "tokenizer_mode": "slow",
             "tokenizer_revision": "v9", "code_revision": "abc", "hf_overrides": '{"rope_theta": 1}'}


def spellings(dest: str, value: str) -> list[list[str]]:
    """Ways to set `dest` that vLLM 0.32 accepts: each declared option, with underscores, as its
    shortest unambiguous prefix, with `=`."""
    options = [o for o, (d, _kind) in OPTIONS.items() if d == dest]
    found: list[list[str]] = []
    for option in options:
        names = [option]
        if option.startswith("--"):
            names.append("--" + option[2:].replace("-", "_"))
            shortest = next((option[:n] for n in range(3, len(option))
                             if sum(o.startswith(option[:n]) for o in OPTIONS) == 1), None)
            if shortest:
                names.append(shortest)
        for name in names:
            found += [[name, value], [f"{name}={value}"]]
    return found


def _args(where: str, args: list[str]) -> Mutation:
    def mutate(spec: JSON) -> None:
        if where == "engine":
            spec["engine"]["extraArgs"] = [*spec["engine"].get("extraArgs", []), *args]
        else:
            role, index = where.split(":")
            _pool(spec, role, int(index))["extraArgs"] = args
    return mutate


def vllm_cases() -> Iterator[Generated]:
    engine_args = len(load_example("ucmcluster-heterogeneous.yaml")["spec"]["engine"]["extraArgs"])
    targets = {"engine": f"spec.engine.extraArgs[{engine_args}]", "prefill:0": "spec.prefill[0].extraArgs[0]",
               "decode:0": "spec.decode[0].extraArgs[0]"}
    for n, (dest, value) in enumerate(OWNED_VALUES.items()):
        for m, args in enumerate(spellings(dest, value)):
            where = list(targets)[(n + m) % len(targets)]          # spread over engine and pools
            yield targets[where], f"owned {dest} as {args} in {where}", _args(where, args)
    for sub, value in (("kv_role", "kv_both"), ("kv_connector", "Other"), ("kv_connector_extra_config.store_path", "/x")):
        for name in ("--kv-transfer-config", "--kv_transfer_config"):
            for args in ([f"{name}.{sub}", value], [f"{name}.{sub}={value}"]):
                yield targets["decode:0"], f"dotted {args}", _args("decode:0", args)
    for dest, value in KV_VALUES.items():
        for args in spellings(dest, value)[::2]:
            # the prefill pool differs from decode[0], the reference: named on prefill[0].extraArgs
            where = "prefill:0" if len(args) == 2 else "decode:0"
            yield "spec.prefill[0].extraArgs", f"{dest} only in {where} as {args}", _args(where, args)
    for dest in KV_VALUES:
        option = "--" + dest.replace("_", "-")
        typo = option[:-1] + ("x" if option[-1] != "x" else "y")  # not an option, nor a prefix of one
        yield targets["decode:0"], f"unknown flag {typo}", _args("decode:0", [typo, "1"])
        yield targets["prefill:0"], f"{option} without its value", _args("prefill:0", [option])
    for option in ("--kv-cache-dtype", "--quantization", "--tokenizer", "--max-num-seqs", "--enable-prefix-caching"):
        # the longest prefix that is not an option itself and fits two or more options
        prefix = next(option[:n] for n in range(len(option) - 1, 2, -1)
                      if option[:n] not in OPTIONS and sum(o.startswith(option[:n]) for o in OPTIONS) > 1)
        yield targets["decode:0"], f"ambiguous {prefix}", _args("decode:0", [prefix, "1"])


# --- class 3: facts of the live cluster (e2e/nodes.py's nodes; claims the case creates) -------

# (role, product, GPUs of its nodes in e2e/nodes.py)
GPU_POOLS = (("prefill", "NVIDIA-H100-80GB-HBM3", 8), ("decode", "NVIDIA-L40S", 4))


def claim(name: str, size: str, modes: list[str]) -> JSON:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": modes, "resources": {"requests": {"storage": size}},
                     "storageClassName": "ucm-e2e-none"}}   # no provisioner: the claim stays as created


def _gpus(role: str, count: int, selector: JSON | None = None, affinity: JSON | None = None) -> Mutation:
    def mutate(spec: JSON) -> None:
        pool = _pool(spec, role, 0)
        pool["gpu"] = {"count": count} if selector or affinity else {**pool["gpu"], "count": count}
        if selector:
            pool["nodeSelector"] = selector
        if affinity:
            pool["affinity"] = affinity
    return mutate


def _store(**store: Any) -> Mutation:
    return lambda spec: spec.__setitem__("store", {**store})


def facts_cases() -> Iterator[Generated]:
    for role, product, most in GPU_POOLS:
        for count in range(most + 1, 17):
            yield f"spec.{role}[0].gpu.count", f"{count} GPUs on {product}", _gpus(role, count)
        for count in (most + 1, 16):
            host = {"kubernetes.io/hostname": f"gpu-{'h100' if 'H100' in product else 'l40s'}-1"}
            yield f"spec.{role}[0].gpu.count", f"{count} GPUs pinned to {host}", _gpus(role, count, selector=host)
            affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": [product]}]}]}}}
            yield f"spec.{role}[0].gpu.count", f"{count} GPUs by affinity to {product}", _gpus(role, count,
                                                                                                affinity=affinity)
    # no product at all: the largest node anywhere (H100, 8) is the limit
    for count in (9, 12):
        yield "spec.decode[0].gpu.count", f"{count} GPUs on any node", _gpus("decode", count, selector={"type": "kwok"})
    for n, (size, capacity) in enumerate(itertools.product(("1Gi", "10Gi", "100Gi"), ("2", "1.5"))):
        amount = {"1Gi": 1, "10Gi": 10, "100Gi": 100}[size] * float(capacity)
        name = f"small-{n}"
        yield ("spec.store.capacity", f"capacity {amount}Gi on a {size} claim",
               _store(existingClaim=name, capacity=f"{amount:g}Gi"), (claim(name, size, ["ReadWriteMany"]),))
    for n, modes in enumerate((["ReadWriteOnce"], ["ReadOnlyMany"], ["ReadWriteOncePod"], ["ReadOnlyMany", "ReadWriteOnce"])):
        name = f"modes-{n}"
        yield ("spec.store.existingClaim", f"claim with accessModes {modes}", _store(existingClaim=name),
               (claim(name, "10Gi", modes),))
    for path in ("/etc/ucm/store", "/etc", "/etc/ucm/", "/dev/shm/ucm", "/dev", "/"):
        yield "spec.store.mountPath", f"store mounted at {path}", lambda spec, path=path: spec["store"].__setitem__(
            "mountPath", path)
    for path in ("/models", "/models/kv", "/"):
        def on_model_claim(spec: JSON, path: str = path) -> None:
            spec["model"]["source"] = "pvc://weights/llama"
            spec["store"]["mountPath"] = path
        yield "spec.store.mountPath", f"store at {path} with the model on a claim", on_model_claim


GENERATORS: dict[str, Callable[[], Iterator[Generated]]] = {
    "k8s": k8s_cases,
    "vllm": vllm_cases,
    "facts": facts_cases,
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
