"""The operator killed in the middle of a reconcile, then restarted, converges.

The kill is deterministic: UCM_OPERATOR_FAULT_EXIT_AFTER_WRITES=N makes the process exit abruptly
(os._exit(137), like SIGKILL) right before its (N+1)-th write, so the test knows exactly which
state it left behind — some children created, the rest and the status not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from ucm_operator.build import build_children
from ucm_operator.kube import FAULT_ENV, STALL_ENV, Kube
from ucm_operator.spec import parse_cluster

from e2e.access import ClusterAccess
from e2e.operator_support import (
    OperatorProcess,
    apply_cluster,
    condition,
    get_cluster,
    load_example,
    operator_kubeconfig,
    running_operator,
    wait_condition,
)
from e2e.wait import wait_for

pytestmark = pytest.mark.e2e


def existing_children(kube: Kube, namespace: str, name: str) -> set[tuple[str, str]]:
    spec = parse_cluster(load_example("ucmcluster-heterogeneous.yaml", name=name, namespace=namespace))
    return {(c["kind"], c["metadata"]["name"]) for c in build_children(spec)
            if kube.get(c["apiVersion"], c["kind"], namespace, c["metadata"]["name"]) is not None}


def test_killed_mid_reconcile_then_restarted_converges(cluster: ClusterAccess, namespace: str,
                                                      k8s_api: client.ApiClient, crd: None, tmp_path: Path) -> None:
    kube = Kube(k8s_api)
    kubeconfig = operator_kubeconfig(cluster, namespace, tmp_path / "operator.kubeconfig")
    total = len(build_children(parse_cluster(load_example("ucmcluster-heterogeneous.yaml", namespace=namespace))))
    for n, crash_after in enumerate((2, 7)):
        name = f"crash-{crash_after}"
        body = load_example("ucmcluster-heterogeneous.yaml", name=name, namespace=namespace)
        # 1. Creation interrupted after `crash_after` writes: exactly that many children exist.
        crashing = OperatorProcess(kubeconfig, namespace, tmp_path / f"crash-{n}.log",
                                   env={FAULT_ENV: str(crash_after)}).start()
        apply_cluster(cluster, namespace, body)
        assert crashing.proc is not None and crashing.proc.wait(timeout=60) == 137, crashing.log()[-2000:]
        assert len(existing_children(kube, namespace, name)) == crash_after
        assert not (get_cluster(kube, namespace, name) or {}).get("status")
        # 2. A fresh process finishes the job.
        with running_operator(cluster, namespace, tmp_path / f"run-{n}", resync_seconds=60) as operator:
            served = wait_condition(kube, namespace, name, "Serving", timeout=120,
                                    extra=lambda b: condition(b, "Progressing")["status"] == "False")
            assert len(existing_children(kube, namespace, name)) == total
            assert served["status"]["prefill"] == "1/1"
            assert "reconciled" in operator.log()
    # 3. An update interrupted after its first write (the ConfigMap; the Deployments still old).
    name = "crash-7"
    body = load_example("ucmcluster-heterogeneous.yaml", name=name, namespace=namespace)
    old_rev = wait_condition(kube, namespace, name, "Serving", timeout=10)["status"]["revision"]
    crashing = OperatorProcess(kubeconfig, namespace, tmp_path / "crash-update.log", env={FAULT_ENV: "1"}).start()
    # The start-up pass over the unchanged clusters writes nothing (or the fault would fire here).
    for existing in ("crash-2", "crash-7"):
        wait_for(lambda e=existing: f"first pass over {namespace}/{e} done: 0 writes" in crashing.log(),
                 f"a write-free first pass over {existing}", timeout_s=60)
    assert crashing.proc is not None and crashing.proc.poll() is None
    body["spec"]["engine"]["dtype"] = "float16"
    apply_cluster(cluster, namespace, body)
    assert crashing.proc.wait(timeout=60) == 137

    def deployment_revisions() -> set[str]:
        return {d["spec"]["template"]["metadata"]["labels"]["ucm.dev/revision"]
                for d in kube.list("apps/v1", "Deployment", namespace, f"ucm.dev/cluster={name},ucm.dev/role!=router")}
    assert deployment_revisions() == {old_rev}
    with running_operator(cluster, namespace, tmp_path / "run-update", resync_seconds=60):
        def converged() -> Any:
            body = get_cluster(kube, namespace, name)
            rev = (body or {}).get("status", {}).get("revision")
            return (rev and rev != old_rev and deployment_revisions() == {rev}
                    and condition(body, "Serving").get("status") == "True"
                    and condition(body, "Progressing").get("status") == "False")
        wait_for(converged, "convergence to the new revision", timeout_s=120)


def test_sigterm_during_a_stuck_reconcile_exits_after_the_drain(cluster: ClusterAccess, namespace: str,
                                                               crd: None, tmp_path: Path) -> None:
    """A reconcile blocked in an API call that never returns must not hold the process past the
    pod's grace period (30 s, the Deployment default): on SIGTERM the operator gives running
    reconciles its drain time (10 s), names the one it abandons and exits 0 without joining it."""
    kubeconfig = operator_kubeconfig(cluster, namespace, tmp_path / "operator.kubeconfig")
    stuck = OperatorProcess(kubeconfig, namespace, tmp_path / "stuck.log", env={STALL_ENV: "2"}).start()
    try:
        apply_cluster(cluster, namespace, load_example("ucmcluster-heterogeneous.yaml", name="stuck",
                                                       namespace=namespace))
        wait_for(lambda: "fault injection: blocking forever before write #3" in stuck.log(),
                 "the reconcile to block on its third write", timeout_s=60)
    finally:
        stopped = stuck.stop(grace_s=30)
    log = stuck.log()
    assert stopped.exit_code == 0 and not stopped.killed, f"{stopped.describe()}\n{log[-3000:]}"
    assert f"abandoned the reconcile of {namespace}/stuck" in log, log[-3000:]
