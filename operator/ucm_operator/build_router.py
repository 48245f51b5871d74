"""Manifests for the PD router: its Deployment and Service, and the minimal RBAC its EndpointSlice
discovery needs (get/list/watch on endpointslices and pods in its own namespace, nothing else).
"""

from __future__ import annotations

import copy

from .build_workers import build_pdb
from .constants import ROLE_ROUTER, ROUTER_PORT, router_image_default
from .meta import JSON, object_meta, router_name, selector_labels
from .spec import ClusterSpec

DEFAULT_ROUTER_RESOURCES: JSON = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}


def router_args(spec: ClusterSpec) -> list[str]:
    """Arguments after `ucm router serve` (the command line agreed in docs/interfaces)."""
    return [
        "--host", "0.0.0.0",
        "--port", str(ROUTER_PORT),
        "--model", spec.model.served_name,
        "--discovery", "kubernetes",
        "--namespace", spec.namespace,
        "--cluster", spec.name,
        "--policy", spec.router.policy,
        "--fallback", spec.router.fallback,
    ]


def build_router_deployment(spec: ClusterSpec) -> JSON:
    name = router_name(spec)
    meta = object_meta(spec, name, ROLE_ROUTER, ROLE_ROUTER)
    # The router's pods carry no revision label: nothing in the router depends on it, and an
    # engine change must not restart the router that keeps old-revision pairs serving meanwhile.
    pod_labels = {k: v for k, v in meta["labels"].items() if k != "ucm.dev/revision"}
    probe = {"httpGet": {"port": "http"}, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3}
    container: JSON = {
        "name": "router",
        "image": spec.router.image or router_image_default(),
        "imagePullPolicy": "IfNotPresent",
        "command": ["ucm", "router", "serve"],
        "args": router_args(spec),
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "resources": copy.deepcopy(spec.router.resources or DEFAULT_ROUTER_RESOURCES),
        "livenessProbe": {**probe, "httpGet": {"path": "/health", "port": "http"}},
        "readinessProbe": {**probe, "httpGet": {"path": "/ready", "port": "http"}},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector_labels(spec, ROLE_ROUTER, ROLE_ROUTER)},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {"serviceAccountName": name, "containers": [container]},
            },
        },
    }


def build_router_service(spec: ClusterSpec) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(spec, router_name(spec), ROLE_ROUTER, ROLE_ROUTER),
        "spec": {
            "type": spec.router.service_type,
            "selector": selector_labels(spec, ROLE_ROUTER, ROLE_ROUTER),
            "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_router_rbac(spec: ClusterSpec) -> list[JSON]:
    name = router_name(spec)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": object_meta(spec, name, ROLE_ROUTER, ROLE_ROUTER)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": object_meta(spec, name, ROLE_ROUTER, ROLE_ROUTER),
         "rules": [
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": object_meta(spec, name, ROLE_ROUTER, ROLE_ROUTER),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}]},
    ]


def build_router(spec: ClusterSpec) -> list[JSON]:
    children = [*build_router_rbac(spec), build_router_deployment(spec), build_router_service(spec)]
    if spec.router.replicas > 1:
        children.append(build_pdb(spec, ROLE_ROUTER, ROLE_ROUTER, router_name(spec)))
    return children
