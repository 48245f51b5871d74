"""`make demo`: the whole system on one machine, end to end, and torn down on Ctrl-C.

Steps: start the local control plane (simulated H100 and L40S nodes), `helm install` the chart,
run the operator as a local process under the chart's ServiceAccount (a real token from the
TokenRequest API, so the demo also proves the chart's RBAC is enough), apply
examples/ucmcluster-heterogeneous.yaml, show progress until the UCMCluster is Serving, print the
topology and the kubectl commands to explore it, then wait for Ctrl-C.

The operator Deployment that the chart creates gets a pod on the CPU-only simulated node (kwok
marks it Ready; no container runs there), which is why the real operator runs here instead.

UCM_DEMO_EXIT_WHEN_SERVING=1 makes it non-interactive: it exits 0 once Serving, after the same
teardown as Ctrl-C, with nothing left running.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from e2e.access import ClusterAccess, ClusterError
from e2e.binaries import BinariesMissing
from e2e.processes import stop_group

from . import answer, view
from .cluster import leftover_processes, start_cluster
from .identity import write_service_account_kubeconfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ucm"
EXAMPLE = REPO / "examples" / "ucmcluster-heterogeneous.yaml"
GROUP, VERSION, PLURAL = "ucm.dev", "v1alpha1", "ucmclusters"


class DemoFailed(RuntimeError):
    """A step did not reach its goal; the message says which and what to look at."""


def say(message: str) -> None:
    print(message, flush=True)


def step(number: int, total: int, message: str) -> None:
    say(f"\n[{number}/{total}] {message}")


_received: list[str] = []


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT (Ctrl-C) and SIGTERM both mean: stop, tear down in order, exit."""
    _received.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


class Demo:
    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.workdir = Path(tempfile.mkdtemp(prefix="ucm-demo-"))
        self.cluster: ClusterAccess | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_log = self.workdir / "operator.log"
        self.spec: dict[str, Any] = {}
        self.name = ""

    # -- helpers ---------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True) -> str:
        assert self.cluster is not None
        result = self.cluster.kubectl(*args, check=False, timeout_s=120)
        if check and result.returncode != 0:
            raise DemoFailed(f"kubectl {' '.join(args)} failed:\n{result.stderr.strip()}")
        return str(result.stdout)

    def helm(self, *args: str, check: bool = True) -> str:
        assert self.cluster is not None
        result = self.cluster.helm(*args, check=False, timeout_s=300)
        if check and result.returncode != 0:
            raise DemoFailed(f"helm {' '.join(args)} failed:\n{result.stderr.strip()}")
        return str(result.stdout)

    def get_json(self, *args: str) -> Any:
        return yaml.safe_load(self.kubectl(*args, "-o", "json"))

    # -- steps -----------------------------------------------------------------------------
    def start_control_plane(self) -> None:
        t0 = time.monotonic()
        self.cluster = start_cluster(self.stack, self.workdir)
        nodes = self.get_json("get", "nodes")["items"]
        say(f"      control plane up in {time.monotonic() - t0:.1f}s, server: {self.cluster.server}, "
            f"KUBECONFIG={self.cluster.kubeconfig}")
        for node in nodes:
            product = node["metadata"].get("labels", {}).get(view.GPU_PRODUCT_LABEL, "(no GPU)")
            gpus = node["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")
            say(f"      node {node['metadata']['name']:<12} {product:<24} {gpus} GPUs")

    def install_chart(self) -> str:
        ns, release = self.args.namespace, self.args.release
        t0 = time.monotonic()
        self.helm("install", release, str(CHART), "--namespace", ns, "--create-namespace", "--wait",
                  "--timeout", "180s")
        self.stack.callback(self._uninstall_chart)
        deployments = self.get_json("-n", ns, "get", "deployments", "-l",
                                    f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator")
        (deploy,) = deployments["items"]
        sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
        node = self.kubectl("-n", ns, "get", "pods", "-l", f"app.kubernetes.io/instance={release}",
                            "-o", "jsonpath={.items[0].spec.nodeName}")
        say(f"      release {release} in {ns} ({time.monotonic() - t0:.1f}s): Deployment "
            f"{deploy['metadata']['name']} Available, its pod on simulated node {node}; ServiceAccount {sa}")
        return str(sa)

    def _uninstall_chart(self) -> None:
        say(f"      helm uninstall {self.args.release}")
        self.helm("uninstall", self.args.release, "--namespace", self.args.namespace, "--wait", "--timeout", "60s",
                  check=False)

    def service_account_kubeconfig(self, service_account: str) -> Path:
        """A kubeconfig that authenticates as the chart's ServiceAccount with a bound token."""
        assert self.cluster is not None
        path = self.workdir / "operator.kubeconfig"
        try:
            write_service_account_kubeconfig(self.cluster, self.args.namespace, service_account, path)
        except (RuntimeError, subprocess.CalledProcessError) as error:
            raise DemoFailed(f"could not act as the chart's ServiceAccount: {error}") from error
        return path

    def start_operator(self, kubeconfig: Path) -> None:
        command = [str(Path(sys.executable).parent / "ucm-operator"), "run", "--namespace", self.args.namespace]
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
        log = self.operator_log.open("wb")
        # Its own session: the terminal's Ctrl-C reaches only the demo, which stops the operator after
        # deleting the UCMCluster, in order.
        self.operator = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=REPO)
        log.close()
        self.stack.callback(self._stop_operator)
        say(f"      pid {self.operator.pid}: {' '.join(command[-3:])}, as the chart's ServiceAccount; "
            f"log {self.operator_log}")

    def _stop_operator(self) -> None:
        proc = self.operator
        if proc is None or proc.poll() is not None:
            return
        say(f"      stopping the operator (pid {proc.pid})")
        stopped = stop_group(proc, grace_s=20)
        say(f"      operator {stopped.describe()}")
        # Everything the operator made is gone by now either way: a slow or odd exit gets a WARNING
        # that says why, and fails the teardown only if something of the operator still runs.
        if stopped.killed:
            say(f"      WARNING: the operator was still running 20s after SIGTERM (threads: {stopped.threads}); "
                f"its log ends:\n{self.operator_log_tail(15)}")
        if stopped.reaped_directly or stopped.zombie:
            say(f"      WARNING: the operator exited, but not as a child that Popen could reap: {stopped.unreaped}")
        if stopped.exit_code is None and not stopped.zombie:
            raise DemoFailed(f"the operator (pid {proc.pid}) is {stopped.describe()}")

    def operator_log_tail(self, lines: int = 30) -> str:
        if not self.operator_log.exists():
            return "(no operator log)"
        return "\n".join(self.operator_log.read_text(errors="replace").splitlines()[-lines:])

    def apply_example(self) -> None:
        manifest = yaml.safe_load(self.args.example.read_text())
        self.name, self.spec = manifest["metadata"]["name"], manifest["spec"]
        self.kubectl("-n", self.args.namespace, "apply", "-f", str(self.args.example))
        self.stack.callback(self._delete_cluster)
        pools = [f"{role} {p['name']} x{p.get('replicas', 1)} TP{p.get('tensorParallelSize', 1)} on "
                 f"{(p.get('gpu') or {}).get('product', 'any GPU')}"
                 for role in ("prefill", "decode") for p in self.spec.get(role, [])]
        say(f"      UCMCluster {self.name}: {'; '.join(pools)}")

    def _delete_cluster(self) -> None:
        ns = self.args.namespace
        say(f"      deleting UCMCluster {self.name} (its children go by garbage collection)")
        t0 = time.monotonic()
        self.kubectl("-n", ns, "delete", PLURAL, self.name, "--wait=true", "--timeout=60s", check=False)
        selector = f"{view.LABEL_CLUSTER}={self.name}"
        reported = 0.0
        while True:
            left = self.kubectl("-n", ns, "get", "deployments,pods", "-l", selector, "-o", "name", check=False).split()
            elapsed = time.monotonic() - t0
            if not left:
                say(f"      all Deployments and pods of the UCMCluster are gone ({elapsed:.0f}s)")
                return
            if elapsed > 90:
                say(f"      still there after 90s (the control plane goes down next anyway): {left}")
                return
            if elapsed - reported >= 10:
                # The garbage collector notices a new CRD's owners on its periodic (30 s) discovery sync.
                say(f"      waiting for the garbage collector: {len(left)} objects left")
                reported = elapsed
            time.sleep(1)

    def watch_until_serving(self) -> view.Snapshot:
        ns, deadline = self.args.namespace, time.monotonic() + self.args.timeout
        t0, last, snap = time.monotonic(), "", None
        while True:
            if self.operator is not None and self.operator.poll() is not None:
                raise DemoFailed(f"the operator exited with code {self.operator.returncode}; its log ends:\n"
                                 f"{self.operator_log_tail()}")
            cr = self.get_json("-n", ns, "get", f"{PLURAL}.{GROUP}", self.name)
            pods = self.get_json("-n", ns, "get", "pods", "-l", f"{view.LABEL_CLUSTER}={self.name}")["items"]
            nodes = self.get_json("get", "nodes")["items"]
            snap = view.build_snapshot(cr, pods, nodes)
            text = view.render_progress(snap)
            if text != last:
                say(f"--- {time.monotonic() - t0:5.1f}s\n{text}")
                last = text
            if view.is_serving(cr):
                say(f"      Serving after {time.monotonic() - t0:.1f}s")
                return snap
            if time.monotonic() > deadline:
                events = self.kubectl("-n", ns, "get", "events", "--sort-by=.lastTimestamp", check=False)
                raise DemoFailed(f"UCMCluster {self.name} not Serving after {self.args.timeout}s.\nEvents:\n"
                                 f"{events[-3000:]}\nOperator log ends:\n{self.operator_log_tail()}")
            time.sleep(1.0)

    def run(self) -> int:
        total = 5
        step(1, total, "starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)")
        self.start_control_plane()
        step(2, total, f"helm install {self.args.release} charts/ucm into namespace {self.args.namespace}")
        service_account = self.install_chart()
        step(3, total, "running the operator locally with the chart's ServiceAccount token (its RBAC, nothing more)")
        self.start_operator(self.service_account_kubeconfig(service_account))
        step(4, total, f"kubectl apply -f {self.args.example.relative_to(REPO)}")
        self.apply_example()
        step(5, total, "waiting for Serving (live progress: conditions, pools, pods and the nodes they landed on)")
        snap = self.watch_until_serving()
        assert self.cluster is not None
        say("")
        say(view.render_topology(snap, self.spec))
        say("")
        say(view.render_explore(str(self.cluster.bin_dir / "kubectl"), str(self.cluster.kubeconfig),
                                self.args.namespace, self.name, self.args.release))
        if os.environ.get("UCM_DEMO_ANSWER", "1") != "0":
            say("")
            deployments = self.get_json("-n", self.args.namespace, "get", "deployments", "-l",
                                        f"{view.LABEL_CLUSTER}={self.name}")["items"]
            answer.answer_through_local_pair(deployments, self.spec["model"]["servedName"], self.workdir, say,
                                             self.stack.callback)
        if os.environ.get("UCM_DEMO_EXIT_WHEN_SERVING") == "1":
            say("\nUCM_DEMO_EXIT_WHEN_SERVING=1: tearing down")
            return 0
        say("\nThe demo keeps running. Press Ctrl-C to tear everything down.")
        try:
            while self.operator is None or self.operator.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            say(f"\n{'Ctrl-C' if _received[-1:] in ([], ['SIGINT']) else _received[-1]}: tearing down")
            return 0
        raise DemoFailed(f"the operator exited unexpectedly; its log ends:\n{self.operator_log_tail()}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m e2e.ucm_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", default="ucm-demo", help="namespace for the chart and the UCMCluster")
    parser.add_argument("--release", default="ucm", help="Helm release name")
    parser.add_argument("--example", type=Path, default=EXAMPLE, help="UCMCluster manifest to apply")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("UCM_DEMO_TIMEOUT", "300")),
                        help="seconds to wait for Serving")
    args = parser.parse_args(argv)
    args.example = args.example.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Installed explicitly: a shell that starts us in the background would otherwise leave SIGINT
    # ignored, and Python keeps an inherited SIG_IGN.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    stack = contextlib.ExitStack()
    demo = Demo(args, stack)
    say(f"UCM demo (work directory {demo.workdir})")
    code = 1
    try:
        code = demo.run()
    except KeyboardInterrupt:
        say("\ninterrupted: tearing down")
        code = 130
    except DemoFailed as failure:
        say(f"\nDEMO FAILED: {failure}")
        code = 1
    except (ClusterError, BinariesMissing) as failure:
        say(f"\nDEMO FAILED: the local control plane did not start: {failure}")
        code = 1
    finally:
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.close()
        except Exception as error:  # the teardown's own failure must not hide the demo's result
            say(f"teardown error: {error!r}")
            code = code or 1
        left = leftover_processes(demo.workdir)
        if left:
            say(f"processes still running that use {demo.workdir}: {left}")
            code = code or 1
        if code in (0, 130):
            shutil.rmtree(demo.workdir, ignore_errors=True)
        else:
            say(f"kept the work directory for inspection: {demo.workdir}")
    if code == 0:
        say("demo finished: nothing left running")
    else:
        say(f"demo exit code {code}" + ("" if left else " (nothing left running)"))
    return code
