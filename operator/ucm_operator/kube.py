"""A small, typed layer over the synchronous `kubernetes` client for the few operations the
operator performs on plain JSON objects: server-side apply (for real, or as a dry run that asks the
API server whether it would accept the object), list by label, delete with a uid precondition,
read, status merge-patch, and Events.

It talks to the API with plain dicts (no generated model classes), so a manifest built by the
builders goes out byte-for-byte, and it counts every write, so tests and `ucm-operator bench`
can prove that a no-op resync writes nothing. Dry runs persist nothing, so they are counted
apart (`dry_runs`), not as writes.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from .constants import FIELD_MANAGER, PLURAL, POOL_PLURAL, VERSION

JSON = dict[str, Any]
log = logging.getLogger(__name__)

# (apiVersion, kind) -> plural, for every kind the operator creates or reads. Order matters for
# pruning (workloads before the RBAC and config they use).
RESOURCES: dict[tuple[str, str], str] = {
    ("ucm.dev/" + VERSION, "UCMPool"): POOL_PLURAL,
    ("apps/v1", "Deployment"): "deployments",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Pod"): "pods",
    ("v1", "Node"): "nodes",
    ("v1", "Event"): "events",
    ("ucm.dev/" + VERSION, "UCMCluster"): PLURAL,
}
# What the reconciler applies and prunes (everything it creates).
CHILD_KINDS: tuple[tuple[str, str], ...] = tuple(k for k in RESOURCES if k[1] not in ("Pod", "Node", "Event", "UCMCluster"))
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FAULT_ENV = "UCM_OPERATOR_FAULT_EXIT_AFTER_WRITES"
STALL_ENV = "UCM_OPERATOR_FAULT_STALL_AFTER_WRITES"


class KubeError(Exception):
    """A failed API call: HTTP status, the API's reason (e.g. Invalid, Conflict), its message, the
    reasons of its `details.causes` (e.g. NamespaceTerminating) and, for a refused object, each
    cause's (field path, message) — e.g. ("spec.template.spec.containers[0].resources.requests[cpu]",
    "Invalid value: ...") — which admission.py maps back to the UCMCluster field."""

    def __init__(self, status: int, reason: str, message: str, causes: Sequence[str] = (),
                 fields: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.causes = tuple(causes)
        self.fields = tuple(fields)

    @property
    def namespace_terminating(self) -> bool:
        """The namespace is being deleted, so nothing new may be created in it. Not an RBAC
        denial, although the API answers 403 Forbidden: the namespace controller is about to
        delete the cluster too, so there is nothing to retry."""
        return self.status == 403 and "NamespaceTerminating" in self.causes


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    plural = RESOURCES[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"


def object_path(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{collection_path(obj['apiVersion'], obj['kind'], meta.get('namespace'))}/{meta['name']}"


def resource_of(path: str) -> str:
    """"deployments" for .../namespaces/NS/deployments/NAME, "ucmclusters/status" for its status."""
    parts = path.strip("/").split("/")
    rest = parts[parts.index("namespaces") + 2:] if "namespaces" in parts else parts[2:]
    if not rest:
        return path
    return f"{rest[0]}/{rest[2]}" if len(rest) >= 3 else rest[0]


def load_api_client(kubeconfig: str | None = None, pool_size: int = 16) -> k8s_client.ApiClient:
    """An ApiClient from the given kubeconfig, $KUBECONFIG/~/.kube/config, or the in-cluster
    service account — the same lookup kopf uses, so both talk to one cluster as one identity."""
    configuration = k8s_client.Configuration()
    # $KUBECONFIG is read now, not when the kubernetes package was imported.
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if kubeconfig or os.path.exists(os.path.expanduser("~/.kube/config")):
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = pool_size
    return k8s_client.ApiClient(configuration)


class Kube:
    """JSON-in, JSON-out API access with a write counter (per verb and kind)."""

    def __init__(self, api: k8s_client.ApiClient, *, timeout: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout
        self.writes: collections.Counter[str] = collections.Counter()
        self.dry_runs: collections.Counter[str] = collections.Counter()
        self.calls = 0   # every request, reads included: what a pass costs the API server
        self._lock = threading.Lock()
        fault = os.environ.get(FAULT_ENV, "")
        # Fault injection for the restart tests: exit abruptly, like SIGKILL, after N writes; or
        # block forever, like an API call that never returns (the shutdown test).
        self._exit_after = int(fault) if fault.isdigit() else 0
        stall = os.environ.get(STALL_ENV, "")
        self._stall_after = int(stall) if stall.isdigit() else 0

    def counters(self) -> tuple[collections.Counter[str], collections.Counter[str], int]:
        """Copies of (writes, dry runs, API calls) for the operator's metrics."""
        with self._lock:
            return collections.Counter(self.writes), collections.Counter(self.dry_runs), self.calls

    @property
    def total_writes(self) -> int:
        with self._lock:
            return sum(self.writes.values())

    def request(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
                body: Any = None, content_type: str = "application/json") -> JSON:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        url_path = path + ("?" + urllib.parse.urlencode(list(query)) if query else "")
        request = self.api.param_serialize(method, url_path, header_params=headers, body=body,
                                           auth_settings=["BearerToken"])
        with self._lock:
            self.calls += 1
        if ("dryRun", "All") in query:
            with self._lock:
                self.dry_runs[f"{method} {resource_of(path)}"] += 1
        elif method in WRITE_VERBS:
            self._count_write(method, path)
        response = self.api.call_api(*request, _request_timeout=self.timeout)
        data = response.read() or b"{}"  # type: ignore[no-untyped-call]
        try:
            payload = json.loads(data)
        except ValueError:
            payload = {"message": data.decode(errors="replace")}
        if not 200 <= response.status < 300:
            details = payload.get("details") if isinstance(payload, dict) else None
            causes = [c for c in (details or {}).get("causes") or [] if isinstance(c, dict)]
            raise KubeError(response.status, str(payload.get("reason") or response.reason),
                            str(payload.get("message") or payload), [str(c.get("reason", "")) for c in causes],
                            [(str(c["field"]), str(c.get("message", ""))) for c in causes if c.get("field")])
        return payload if isinstance(payload, dict) else {"items": payload}

    def _count_write(self, method: str, path: str) -> None:
        with self._lock:
            self.writes[f"{method} {resource_of(path)}"] += 1
            count = sum(self.writes.values())
        if self._exit_after and count > self._exit_after:
            log.error("fault injection: exiting before write #%d (%s %s)", count, method, path)
            os._exit(137)
        if self._stall_after and count > self._stall_after:
            log.error("fault injection: blocking forever before write #%d (%s %s)", count, method, path)
            threading.Event().wait()

    # --- typed helpers -----------------------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> JSON | None:
        try:
            return self.request("GET", f"{collection_path(api_version, kind, namespace)}/{name}")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str = "") -> list[JSON]:
        query = [("labelSelector", label_selector)] if label_selector else []
        result = self.request("GET", collection_path(api_version, kind, namespace), query=query)
        items: list[JSON] = result.get("items") or []
        for item in items:  # list items omit apiVersion/kind; restore them for uniform handling
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    @property
    def total_dry_runs(self) -> int:
        with self._lock:
            return sum(self.dry_runs.values())

    def apply(self, manifest: Mapping[str, Any], *, dry_run: bool = False, manager: str = FIELD_MANAGER) -> JSON:
        """Server-side apply under the operator's field manager (`manager`: another one of the
        operator's, for the fields only a UCMPool re-base writes). force=true: the operator is the
        sole authority over the fields it sets; a conflicting manual edit is overwritten (and the
        edit's own fields, not in the manifest, are left alone). `dry_run`: the API server runs
        the whole request — schema, defaulting, validation, admission — against the live object
        and answers what it would store, but stores nothing."""
        query = [("fieldManager", manager), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        return self.request("PATCH", object_path(manifest), query=query,
                            body=dict(manifest), content_type="application/apply-patch+yaml")

    def delete(self, obj: Mapping[str, Any]) -> None:
        """Delete exactly this object (uid precondition: never a same-named successor)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background",
                "preconditions": {"uid": obj["metadata"]["uid"]}}
        try:
            self.request("DELETE", object_path(obj), body=body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    def patch_status(self, obj: Mapping[str, Any], status: Mapping[str, Any]) -> JSON:
        return self.request("PATCH", object_path(obj) + "/status", body={"status": dict(status)},
                            content_type="application/merge-patch+json")

    def event(self, obj: Mapping[str, Any], *, type_: str, reason: str, message: str, when: str) -> None:
        """A core/v1 Event about `obj` (what `kubectl describe` shows)."""
        meta = obj["metadata"]
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion", "")},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": when, "lastTimestamp": when, "count": 1,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER, "reportingInstance": os.environ.get("POD_NAME", FIELD_MANAGER),
        }
        self.request("POST", collection_path("v1", "Event", meta["namespace"]), body=event)
