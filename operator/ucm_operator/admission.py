"""Ask the API server itself whether it would accept every child, before any of them is written,
and name the UCMCluster field behind each refusal.

Why the API server: resources, node selectors, tolerations, affinity, env and volumes are copied
from the UCMCluster into Deployments, PVCs and Services, and the rules those core/v1 objects obey
(quantity syntax, a limit not below its request, label syntax, toleration combinations, unknown
fields inside a pass-through object, unique mount paths...) are many and change between releases.
Checking them by hand here would always lag; a server-side-apply dry run (the same apply path,
`Kube.apply(dry_run=True)`) runs the real schema, defaulting, validation and admission and
persists nothing. What comes back names a field of the child
(`spec.template.spec.containers[0].resources.requests[memory]`); `origins` says which UCMCluster
field produced each part of each child, so the refusal becomes `Valid=False` on the user's own
field (`spec.decode[0].resources.requests.memory`) and nothing is created.

Cost: only children that would be applied are dry-run (a no-op resync applies nothing, so it
dry-runs nothing), and each verdict is remembered per (manifest hash, live object version), so a
cluster that stays invalid is not asked about again on every resync.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .build_workers import vllm_args
from .compat import Problem
from .constants import ANNOTATION_APPLIED_HASH, GPU_PRODUCT_LABEL, GPU_RESOURCE
from .kube import Kube, KubeError
from .meta import claim_name, config_map_name, pool_name, role_service_name, router_name
from .spec import ClusterSpec, PoolSpec

JSON = dict[str, Any]
Segment = str | int
Path = tuple[Segment, ...]
REASON = "RefusedByAPIServer"
_CONTAINER: Path = ("spec", "template", "spec", "containers", 0)
_POD: Path = ("spec", "template", "spec")
# Messages of refusals that happen before validation (the apply patch does not fit the schema:
# an unknown field, a wrong type, a malformed quantity). The API answers them with a 500, but
# like a 422 they are a verdict on the object, not a passing server fault.
_SCHEMA_REFUSALS = ("failed to create typed patch object", "failed to convert new object", "unable to convert")
# The router's RBAC is not dry-run: nothing in it comes from a field the user writes (only the
# cluster's name), and a RoleBinding cannot be checked before its Role exists (RBAC's escalation
# check resolves the Role, which a dry run of the Role does not create).
UNCHECKED_KINDS = frozenset({"ServiceAccount", "Role", "RoleBinding"})
_SSA_PATH = re.compile(r'(?:^|\s)(\.[A-Za-z][^\s]*?): (.+?)(?=\n|$)')
_SIMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SELECTOR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^,]*)')


@dataclasses.dataclass(frozen=True)
class Rule:
    """Part of a child (`prefix`) that comes from the UCMCluster field `field`. `rest`: append the
    remainder of the child's path (the subtree is copied verbatim, e.g. affinity), or not (the
    child's field is computed from `field`, e.g. an image default)."""

    prefix: Path
    field: str
    rest: bool = True


@dataclasses.dataclass(frozen=True)
class Origins:
    """Where one child's fields come from; `root` for the parts no rule covers."""

    root: str
    rules: tuple[Rule, ...] = ()

    def field_of(self, path: Path) -> str:
        best: Rule | None = None
        for rule in self.rules:
            if path[:len(rule.prefix)] == rule.prefix and (best is None or len(rule.prefix) > len(best.prefix)):
                best = rule
        if best is None:
            return self.root
        return best.field + (render(path[len(best.prefix):]) if best.rest else "")


def render(path: Sequence[Segment]) -> str:
    """Path segments in the UCMCluster's notation: `.name`, `[index]`, and `[key]` for map keys
    that are not plain words (`requests[nvidia.com/gpu]`)."""
    out = []
    for seg in path:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
        else:
            out.append(f".{seg}" if _SIMPLE_KEY.match(seg) else f"[{seg}]")
    return "".join(out)


def parse_path(text: str, obj: Any) -> Path:
    """A field path as the API server writes it — validation's `a.b[0].c[key]` or server-side
    apply's `.a.b[name="x"].c` — as segments; list items named by their keys are resolved to their
    index in `obj` (the manifest that was sent)."""
    segments: list[Segment] = []
    text = text.strip().lstrip(".")
    node: Any = obj
    i = 0
    while i < len(text):
        if text[i] == ".":
            i += 1
            continue
        seg: Segment
        if text[i] == "[":
            end = text.find("]", i)
            end = len(text) if end < 0 else end
            seg = _bracket(text[i + 1:end], node)
            i = end + 1
        else:
            end = i
            while end < len(text) and text[end] not in ".[":
                end += 1
            seg, i = text[i:end], end
        segments.append(seg)
        node = _child(node, seg)
    return tuple(segments)


def _bracket(inner: str, node: Any) -> Segment:
    if inner.isdigit():
        return int(inner)
    if "=" in inner and isinstance(node, list):
        wanted: dict[str, Any] = {}
        for key, raw in _SELECTOR.findall(inner):
            try:
                wanted[key] = json.loads(raw)
            except ValueError:
                wanted[key] = raw
        for index, item in enumerate(node):
            if isinstance(item, dict) and all(item.get(k) == v for k, v in wanted.items()):
                return index
    return inner


def _child(node: Any, seg: Segment) -> Any:
    if isinstance(seg, int):
        return node[seg] if isinstance(node, list) and 0 <= seg < len(node) else None
    return node.get(seg) if isinstance(node, dict) else None


# --- where each child's fields come from (a pure function of the spec) ------------------------


def _pool_rules(spec: ClusterSpec, pool: PoolSpec) -> list[Rule]:
    p, c = pool.field, _CONTAINER
    rules = [
        Rule(("metadata", "name"), f"{p}.name", rest=False),
        Rule(("spec", "replicas"), f"{p}.replicas", rest=False),
        Rule((*c, "image"), f"{p}.image" if pool.image else "spec.engine.image", rest=False),
        Rule((*c, "env"), "spec.engine.env"),
        Rule((*c, "args"), f"{p}.extraArgs" if pool.extra_args else "spec.engine.extraArgs", rest=False),
        Rule((*c, "resources"), f"{p}.resources"),
        Rule((*c, "resources", "requests", GPU_RESOURCE), f"{p}.gpu.count", rest=False),
        Rule((*c, "resources", "limits", GPU_RESOURCE), f"{p}.gpu.count", rest=False),
        Rule((*c, "volumeMounts"), "spec.store.mountPath", rest=False),
        Rule((*_POD, "volumes", 0), spec.store.field, rest=False),
        Rule((*_POD, "volumes", 0, "nfs"), "spec.store.nfs"),
        Rule((*_POD, "volumes", 3), "spec.model.source", rest=False),
        Rule((*_POD, "nodeSelector"), f"{p}.nodeSelector"),
        Rule((*_POD, "nodeSelector", GPU_PRODUCT_LABEL), f"{p}.gpu.product", rest=False),
        Rule((*_POD, "tolerations"), f"{p}.tolerations", rest=False),
        Rule((*_POD, "affinity"), f"{p}.affinity"),
    ]
    # The user's extra arguments are the last ones on the command line: engine's, then the pool's.
    first = len(vllm_args(spec, pool)) - len(spec.engine.extra_args) - len(pool.extra_args)
    engine_args = len(spec.engine.extra_args)
    for i in range(len(spec.engine.extra_args) + len(pool.extra_args)):
        field = f"spec.engine.extraArgs[{i}]" if i < engine_args else f"{p}.extraArgs[{i - engine_args}]"
        rules.append(Rule((*c, "args", first + i), field, rest=False))
    rules += [Rule((*_POD, "tolerations", i), f"{p}.tolerations[{i}]") for i in range(len(pool.tolerations))]
    return rules


def origins(spec: ClusterSpec) -> dict[tuple[str, str], Origins]:
    """(kind, name) of every child -> where its fields come from in the UCMCluster."""
    found: dict[tuple[str, str], Origins] = {
        ("ConfigMap", config_map_name(spec)): Origins("spec"),
        ("PersistentVolumeClaim", claim_name(spec)): Origins("spec.store.pvc", (
            Rule(("spec", "resources", "requests", "storage"), "spec.store.pvc.size", rest=False),
            Rule(("spec", "storageClassName"), "spec.store.pvc.storageClassName", rest=False),
            Rule(("spec", "accessModes"), "spec.store.pvc.accessMode", rest=False),
            Rule(("metadata", "name"), "metadata.name", rest=False),
        )),
    }
    for pool in spec.pools:
        found[("Deployment", pool_name(spec, pool.name))] = Origins(pool.field, tuple(_pool_rules(spec, pool)))
        found[("PodDisruptionBudget", pool_name(spec, pool.name))] = Origins(pool.field)
        found[("UCMPool", pool_name(spec, pool.name))] = Origins(pool.field)
    for role in ("prefill", "decode"):
        found[("Service", role_service_name(spec, role))] = Origins(f"spec.{role}")
    router = router_name(spec)
    found[("Deployment", router)] = Origins("spec.router", (
        Rule(("metadata", "name"), "metadata.name", rest=False),
        Rule(("spec", "replicas"), "spec.router.replicas", rest=False),
        Rule((*_CONTAINER, "image"), "spec.router.image", rest=False),
        Rule((*_CONTAINER, "resources"), "spec.router.resources"),
    ))
    found[("Service", router)] = Origins("spec.router.service", (
        Rule(("spec", "type"), "spec.router.service.type", rest=False),
        Rule(("spec", "ports", 0, "port"), "spec.router.service.port", rest=False),
    ))
    for kind in ("ServiceAccount", "Role", "RoleBinding", "PodDisruptionBudget"):
        found.setdefault((kind, router), Origins("spec.router"))
    return found


# --- refusals -> problems ------------------------------------------------------------------


def is_refusal(exc: KubeError) -> bool:
    """A verdict on the object itself (retrying cannot help), as opposed to a failed call."""
    return exc.status in (400, 422) or (exc.status == 500 and exc.message.startswith(_SCHEMA_REFUSALS))


def refusal_problems(manifest: Mapping[str, Any], exc: KubeError, where: Origins) -> list[Problem]:
    """The API server's refusal of `manifest` as problems on the UCMCluster fields behind it."""
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    causes = list(exc.fields)
    if not causes:
        _, _, detail = exc.message.partition("): ")
        causes = [(m.group(1), m.group(2)) for m in _SSA_PATH.finditer(detail)]
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for child_path, message in causes or [("", exc.message)]:
        field = where.field_of(parse_path(child_path, manifest)) if child_path else where.root
        if (field, message) in seen:
            continue
        seen.add((field, message))
        at = f" at {child_path.lstrip('.')}" if child_path else ""
        problems.append(Problem(field, REASON, f"{message} (the API server refuses {kind} {name}{at})"))
    return problems


class Admission:
    """Dry-runs the children a pass would apply and remembers each verdict."""

    MAX_VERDICTS = 4096

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._verdicts: dict[tuple[str, str], tuple[Problem, ...]] = {}
        self._lock = threading.Lock()

    def check(self, spec: ClusterSpec, pending: Sequence[tuple[JSON, JSON | None, str]]) -> list[Problem]:
        """`pending`: (manifest, live object or None, key of manifest hash + live version) of each
        child about to be applied. Problems for every refused child; a KubeError that is not a
        refusal (RBAC, a terminating namespace, an unreachable server) propagates."""
        where = origins(spec)
        problems: list[Problem] = []
        for manifest, _live, version in pending:
            if manifest["kind"] in UNCHECKED_KINDS:
                continue
            digest = str((manifest.get("metadata") or {}).get("annotations", {}).get(ANNOTATION_APPLIED_HASH))
            key = (digest, version)
            with self._lock:
                verdict = self._verdicts.get(key)
            if verdict is None:
                try:
                    self.kube.apply(manifest, dry_run=True)
                    verdict = ()
                except KubeError as exc:
                    if not is_refusal(exc):
                        raise
                    fallback = Origins("spec")
                    verdict = tuple(refusal_problems(
                        manifest, exc, where.get((manifest["kind"], manifest["metadata"]["name"]), fallback)))
                with self._lock:
                    if len(self._verdicts) >= self.MAX_VERDICTS:
                        self._verdicts.clear()
                    self._verdicts[key] = verdict
            problems += verdict
        return problems
