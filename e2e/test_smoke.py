"""Smoke test of the local control plane: the scheduler places GPU pods by product and honours the
GPU taint, kwok makes them Ready, the garbage collector cleans up, and CRDs get served. If any of
this breaks, the operator and router e2e tests would fail for reasons that are not theirs."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from e2e.access import ClusterAccess
from e2e.nodes import GPU_PRODUCT_LABEL, GPU_RESOURCE, L40S
from e2e.wait import wait_for

pytestmark = pytest.mark.e2e

GPU_TOLERATION = client.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")


def gpu_deployment(name: str, product: str, replicas: int, *, tolerate: bool = True) -> client.V1Deployment:
    labels = {"app": name}
    container = client.V1Container(
        name="worker",
        image="registry.k8s.io/pause:3.10",
        resources=client.V1ResourceRequirements(limits={GPU_RESOURCE: "1"}, requests={"cpu": "1", "memory": "1Gi"}),
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[container],
                    node_selector={GPU_PRODUCT_LABEL: product},
                    tolerations=[GPU_TOLERATION] if tolerate else None,
                ),
            ),
        ),
    )


def pods_of(core: client.CoreV1Api, namespace: str, app: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"app={app}").items)


def is_ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def failed_scheduling_message(core: client.CoreV1Api, namespace: str, pod_name: str) -> str | None:
    events = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={pod_name},reason=FailedScheduling"
    ).items
    return events[0].message if events else None


def test_gpu_pods_scheduled_by_product_ready_and_garbage_collected(
    k8s_api: client.ApiClient, namespace: str
) -> None:
    apps = client.AppsV1Api(k8s_api)
    core = client.CoreV1Api(k8s_api)
    apps.create_namespaced_deployment(namespace, gpu_deployment("l40s", L40S, replicas=2))

    def all_ready() -> list[client.V1Pod] | None:
        pods = pods_of(core, namespace, "l40s")
        return pods if len(pods) == 2 and all(is_ready(p) for p in pods) else None

    pods = wait_for(all_ready, "2 Ready pods of Deployment l40s", timeout_s=60)
    for pod in pods:
        node = core.read_node(pod.spec.node_name)
        assert node.metadata.labels[GPU_PRODUCT_LABEL] == L40S, (pod.metadata.name, pod.spec.node_name)
        assert pod.status.phase == "Running"
        assert pod.status.pod_ip, f"{pod.metadata.name} has no pod IP"
    wait_for(
        lambda: (apps.read_namespaced_deployment(name="l40s", namespace=namespace).status.available_replicas or 0) == 2,
        "Deployment l40s available=2",
    )

    rs = apps.list_namespaced_replica_set(namespace, label_selector="app=l40s").items
    assert len(rs) == 1
    apps.delete_namespaced_deployment("l40s", namespace)  # default propagation: the GC removes dependents
    wait_for(
        lambda: not apps.list_namespaced_replica_set(namespace, label_selector="app=l40s").items,
        "the garbage collector to delete ReplicaSet l40s-*",
    )
    wait_for(lambda: not pods_of(core, namespace, "l40s"), "the pods of l40s to be deleted")


@pytest.mark.parametrize(
    ("product", "tolerate", "expected"),
    [
        ("NVIDIA-B200", True, "didn't match Pod's node affinity/selector"),
        (L40S, False, "untolerated taint"),
    ],
    ids=["unknown-product", "gpu-taint-not-tolerated"],
)
def test_unschedulable_gpu_pod_stays_pending_with_failed_scheduling(
    k8s_api: client.ApiClient, namespace: str, product: str, tolerate: bool, expected: str
) -> None:
    apps = client.AppsV1Api(k8s_api)
    core = client.CoreV1Api(k8s_api)
    apps.create_namespaced_deployment(namespace, gpu_deployment("nowhere", product, replicas=1, tolerate=tolerate))
    pod = wait_for(lambda: (pods_of(core, namespace, "nowhere") or [None])[0], "the pod of Deployment nowhere")
    message = wait_for(
        lambda: failed_scheduling_message(core, namespace, pod.metadata.name),
        f"a FailedScheduling event for {pod.metadata.name}",
        timeout_s=30,
    )
    assert expected in message, message
    pod = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_crd_becomes_established_and_served(k8s_api: client.ApiClient, cluster: ClusterAccess, namespace: str) -> None:
    ext = client.ApiextensionsV1Api(k8s_api)
    group, plural = "smoke.e2e.ucm.dev", f"widgets{namespace.replace('-', '')}"[:60]
    crd: dict[str, Any] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": "Widget" + namespace[-6:]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}}},
                        }
                    },
                }
            ],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            status = ext.read_custom_resource_definition(crd["metadata"]["name"]).status
            return any(c.type == "Established" and c.status == "True" for c in status.conditions or [])

        wait_for(established, f"CRD {crd['metadata']['name']} Established", timeout_s=30)
        # Served for real: kubectl (a separate client with its own discovery) creates an object,
        # and the schema is enforced.
        kind = crd["spec"]["names"]["kind"]
        manifest = f"apiVersion: {group}/v1\nkind: {kind}\nmetadata:\n  name: w\nspec:\n  size: 3\n"
        wait_for(lambda: cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest), f"kubectl apply {kind}")
        got = cluster.kubectl("get", plural, "w", "-n", namespace, "-o", "jsonpath={.spec.size}").stdout
        assert got == "3"
        bad = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest.replace("size: 3", "size: 0"), check=False)
        assert bad.returncode != 0 and "spec.size" in bad.stderr, bad.stderr
    finally:
        ext.delete_custom_resource_definition(crd["metadata"]["name"])
