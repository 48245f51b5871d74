"""A real local Kubernetes control plane with simulated GPU nodes, for tests and for `make demo`.

`LocalCluster` starts, on free loopback ports in a temporary directory: etcd, kube-apiserver
(TLS from a generated CA, client-certificate admin in system:masters, Node+RBAC authorization,
service-account signing keys), kube-controller-manager (all default controllers: garbage
collector, deployment, replicaset, namespace, serviceaccount and token, endpointslice,
disruption, ...), kube-scheduler, and kwok with our own stages (e2e/kwok/) that play the kubelet
for nodes annotated `kwok.x-k8s.io/node=fake`. It writes a kubeconfig, waits until each
component reports healthy, and registers the nodes of e2e/nodes.py.

Command line (the Makefile's cluster-up / cluster-down):

    python -m e2e.cluster up      # start in the background; last line: KUBECONFIG=<abs path>
    python -m e2e.cluster down    # stop it and remove its directory
    python -m e2e.cluster status  # is it running?

The background cluster lives in .cache/cluster/ in the repository (git-ignored); its PIDs are in
.cache/cluster/state.json.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from e2e.access import ClusterAccess, ClusterError, write_kubeconfig
from e2e.binaries import BinariesMissing
from e2e.binaries import bin_dir as default_bin_dir
from e2e.nodes import DEFAULT_POOLS, KWOK_ANNOTATION, KWOK_ANNOTATION_VALUE, NodePool, build_nodes
from e2e.pki import ADMIN, CONTROLLER_MANAGER, SCHEDULER, SERVICE_CIDR, Pki, create_pki
from e2e.processes import Component, pid_runs, spawn, stop_components, terminate_groups
from e2e.rest import RestClient

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES_DIR = Path(__file__).resolve().parent / "kwok"
BACKGROUND_DIR = REPO_ROOT / ".cache" / "cluster"
STATE_FILE = "state.json"
# Fake pod IPs (kwok hands them out); like node IPs they exist only in API objects.
POD_CIDR = "10.244.0.1/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


# Reverse start order: clients first, then the API server, then etcd. etcd's graceful stop
# waits for open watch streams and the API server's for etcd, so stopping them together costs
# the whole grace period and ends in SIGKILL (and logs cut short).
STOP_TIERS = (
    ("kwok", "kube-scheduler", "kube-controller-manager"),
    ("kube-apiserver",),
    ("etcd",),
)
PORT_CLASH_ATTEMPTS = 3
TEMP_PREFIX = "ucm-cluster-"
OWNER_FILE = "owner.pid"
KEPT_FILE = "KEPT"


def sweep_orphaned_workdirs(temp_root: Path | None = None) -> list[Path]:
    """Removes temporary cluster directories whose owner process is gone and that were not kept
    on purpose after a failure: what a SIGKILLed test run leaves (its components died with it,
    via PR_SET_PDEATHSIG, but nothing could delete the directory)."""
    removed = []
    for directory in Path(temp_root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            owner = int((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if (directory / KEPT_FILE).exists() or Path(f"/proc/{owner}").exists():
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


class ClusterStartError(ClusterError):
    """A component failed to start or to become healthy; the message names it and its log."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster(ClusterAccess):
    """The control plane's lifecycle. Use as a context manager, or start()/stop().

    detach=False (tests): children die with this process, and stop() runs at interpreter exit
    and on SIGTERM/SIGHUP. detach=True (`up`): children outlive it; their PIDs go to a state
    file for `down`.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        binaries: Path | None = None,
        pools: tuple[NodePool, ...] = DEFAULT_POOLS,
        detach: bool = False,
        verbose: bool = False,
    ) -> None:
        bins = binaries or default_bin_dir(require=True)
        self._own_workdir = workdir is None
        if workdir is None:
            sweep_orphaned_workdirs()
            workdir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            (workdir / OWNER_FILE).write_text(str(os.getpid()))
        self.workdir = workdir.resolve()
        super().__init__(kubeconfig=self.workdir / "kubeconfig", bin_dir=bins, server="")
        self.pools = pools
        self.detach = detach
        self.verbose = verbose
        self.log_dir = self.workdir / "logs"
        self.components: list[Component] = []
        self.ports: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self._stopped = False
        self._lock = threading.Lock()

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.stop(failed=exc_type is not None)

    def start(self, timeout_s: float = 120.0) -> LocalCluster:
        """Starts every component and returns once the cluster can run pods on its nodes."""
        if not self.detach:
            atexit.register(self.stop)
            _install_exit_signals()
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        for attempt in range(1, PORT_CLASH_ATTEMPTS + 1):
            try:
                self._start(deadline)
                break
            except ClusterStartError as exc:
                # free_port() cannot reserve a port: another process may take it before our
                # component binds. Such a clash is retried with fresh ports.
                if "address already in use" not in str(exc) or attempt == PORT_CLASH_ATTEMPTS:
                    self.stop(failed=True)
                    raise
                print(f"local cluster: port clash, retrying ({exc.args[0].splitlines()[0]})", file=sys.stderr)
                self._reset()
            except BaseException:
                self.stop(failed=True)
                raise
        self.timings["total"] = time.monotonic() - t0
        return self

    def _reset(self) -> None:
        """Stops what a failed attempt started and clears its state, for a retry."""
        for tier in STOP_TIERS:
            stop_components([c for c in self.components if c.name in tier])
        self.components.clear()
        self.ports.clear()
        for sub in ("etcd", "apiserver", "controller-manager", "scheduler", "logs"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)

    def stop(self, failed: bool = False) -> None:
        """Stops every component (idempotent). On failure keeps the logs and prints where they
        are; otherwise removes the working directory if this object created it."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        atexit.unregister(self.stop)
        for tier in STOP_TIERS:
            stop_components([c for c in self.components if c.name in tier])
        if failed:
            logs = "\n".join(f"  {c.name}: {c.log_path}" for c in self.components)
            (self.workdir / KEPT_FILE).write_text("logs kept after a failure\n")
            print(f"local cluster failed; component logs kept:\n{logs}", file=sys.stderr)
        elif self._own_workdir and not self.detach:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- start-up ----------------------------------------------------------------------------

    def _mark(self, what: str, since: float) -> None:
        self.timings[what] = time.monotonic() - since
        if self.verbose:
            print(f"  {what}: {self.timings[what]:.1f}s", file=sys.stderr)

    def _spawn(self, name: str, argv: list[str]) -> Component:
        component = spawn(name, argv, self.log_dir, die_with_parent=not self.detach)
        self.components.append(component)
        if self.detach:
            # Recorded at once, so `down` finds even a half-started cluster whose `up` was killed.
            self.write_state(complete=False)
        return component

    def _start(self, deadline: float) -> None:
        t = time.monotonic()
        pki = create_pki(self.workdir / "pki")
        for name in ("etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"):
            self.ports[name] = free_port()
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        write_kubeconfig(self.kubeconfig, self.server, pki, ADMIN)
        for who in (CONTROLLER_MANAGER, SCHEDULER):
            write_kubeconfig(self.workdir / f"{who.file_stem}.kubeconfig", self.server, pki, who)
        self._mark("pki", t)

        t = time.monotonic()
        etcd = self._spawn("etcd", self._etcd_argv())
        etcd_url = f"http://127.0.0.1:{self.ports['etcd-client']}/health"
        self._wait(lambda: b'"health":"true"' in RestClient.plain_get(etcd_url), etcd, deadline, "etcd /health")
        self._mark("etcd", t)

        t = time.monotonic()
        apiserver = self._spawn("kube-apiserver", self._apiserver_argv(pki))
        api = RestClient(self.server, pki, ADMIN)
        self._wait(lambda: api.get_status("/readyz") == 200, apiserver, deadline, "kube-apiserver /readyz")
        self._mark("kube-apiserver", t)

        t = time.monotonic()
        kcm = self._spawn("kube-controller-manager", self._controller_manager_argv(pki))
        scheduler = self._spawn("kube-scheduler", self._scheduler_argv())
        kwok = self._spawn("kwok", self._kwok_argv())
        for node in build_nodes(self.pools):
            api.create("/api/v1/nodes", node)
        for component, port in ((kcm, "controller-manager"), (scheduler, "scheduler"), (kwok, "kwok")):
            scheme = "http" if component is kwok else "https"
            url = f"{scheme}://127.0.0.1:{self.ports[port]}/healthz"
            self._wait(_says_ok(url), component, deadline, f"{component.name} /healthz")
        self._mark("controllers", t)

        t = time.monotonic()
        wanted = {n["metadata"]["name"] for n in build_nodes(self.pools)}
        self._wait(lambda: wanted <= api.ready_node_names(), kwok, deadline, f"nodes {sorted(wanted)} Ready")
        # Pods are admitted only once their namespace's `default` ServiceAccount exists.
        self._wait(
            lambda: api.get_status("/api/v1/namespaces/default/serviceaccounts/default") == 200,
            kcm, deadline, "ServiceAccount default/default",
        )
        self._mark("nodes", t)

    def _wait(self, ready: Callable[[], bool], component: Component, deadline: float, what: str) -> None:
        """Polls `ready` (errors count as not ready) until it holds; fails fast with the
        component's log tail if the component exits, or when the deadline passes."""
        last_error = ""
        while True:
            try:
                if ready():
                    return
            except Exception as exc:
                last_error = f" (last error: {exc})"
            for c in self.components:
                code = c.exited()
                if code is not None:
                    raise ClusterStartError(
                        f"{c.name} exited with code {code} while waiting for {what}; log {c.log_path}:\n"
                        f"{c.log_tail()}"
                    )
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"timed out waiting for {what}{last_error}; log {component.log_path}:\n{component.log_tail()}"
                )
            time.sleep(0.1)

    # ---- command lines -------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd-client']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            self._bin("etcd"),
            "--name=ucm-e2e",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=ucm-e2e={peer}",
            # Throw-away data: skipping fsync makes every API write several ms faster.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_argv(self, pki: Pki) -> list[str]:
        return [
            self._bin("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd-client']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.workdir / 'apiserver'}",
            f"--tls-cert-file={pki.apiserver_cert}",
            f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # 127.0.0.1 is not a valid endpoint address, so the `kubernetes` Service gets none
            # rather than an error every few seconds.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_argv(self, pki: Pki) -> list[str]:
        return [
            self._bin("kube-controller-manager"),
            f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self.workdir / 'controller-manager'}",
            "--leader-elect=false",
            # Every default controller (garbage collector, deployment, replicaset, namespace,
            # serviceaccount, serviceaccount-token, endpoint, endpointslice, disruption, job,
            # statefulset, PV binder, node lifecycle, ...), each under its own service account
            # as kubeadm runs them, so RBAC is exercised as in a real cluster.
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--root-ca-file={pki.ca_cert}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--cluster-name=ucm-e2e",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--profiling=false",
            "--v=1",
        ]

    def _scheduler_argv(self) -> list[str]:
        return [
            self._bin("kube-scheduler"),
            f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.workdir / 'scheduler'}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _kwok_argv(self) -> list[str]:
        stages = sorted(STAGES_DIR.glob("*.yaml"))
        if not stages:
            raise ClusterStartError(f"no kwok stage files in {STAGES_DIR}")
        return [
            self._bin("kwok"),
            f"--kubeconfig={self.kubeconfig}",
            # Only our annotated nodes: a developer's real nodes (if this kubeconfig were ever
            # pointed elsewhere) are never touched.
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}={KWOK_ANNOTATION_VALUE}",
            f"--cidr={POD_CIDR}",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
            f"--config={','.join(str(p) for p in stages)}",
        ]

    # ---- background mode -----------------------------------------------------------------------

    def write_state(self, *, complete: bool) -> None:
        """Writes the state file of a background cluster (atomically: `down` may read it)."""
        tmp = self.workdir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.state(complete=complete), indent=2))
        tmp.replace(self.workdir / STATE_FILE)

    def state(self, *, complete: bool) -> dict[str, Any]:
        return {
            "complete": complete,
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "bin_dir": str(self.bin_dir),
            "processes": [{"name": c.name, "pid": c.pid, "executable": c.argv[0]} for c in self.components],
        }


def _says_ok(url: str) -> Callable[[], bool]:
    return lambda: RestClient.plain_get(url) == b"ok"


_signals_installed = False


def _install_exit_signals() -> None:
    """Turns SIGTERM/SIGHUP into SystemExit so atexit handlers (LocalCluster.stop) run; SIGINT
    already raises KeyboardInterrupt. Only from the main thread and only over default handlers."""
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    _signals_installed = True

    def exit_on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, exit_on_signal)


# ---- python -m e2e.cluster up|down|status ------------------------------------------------------


def _read_state(directory: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state


def _alive_processes(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in state.get("processes", []) if pid_runs(int(p["pid"]), str(p["executable"]))]


def cluster_down(directory: Path = BACKGROUND_DIR) -> int:
    """Stops a background cluster: kills the recorded process groups (only PIDs that still run
    the recorded binary) and removes its directory. Returns how many processes it stopped."""
    state = _read_state(directory)
    stopped = 0
    if state is not None:
        alive = _alive_processes(state)
        executables = {int(p["pid"]): str(p["executable"]) for p in alive}
        for tier in STOP_TIERS:
            pids = [int(p["pid"]) for p in alive if p["name"] in tier]
            terminate_groups(pids, lambda pid: pid_runs(pid, executables[pid]))
        stopped = len(alive)
    shutil.rmtree(directory, ignore_errors=True)
    return stopped


def cluster_up(directory: Path = BACKGROUND_DIR) -> Path:
    """Starts a background cluster in `directory` (or reuses a healthy one) and returns its
    kubeconfig path."""
    state = _read_state(directory)
    if state is not None:
        alive = _alive_processes(state)
        if state.get("complete") and alive and len(alive) == len(state["processes"]):
            print(f"local cluster already running (pids {[p['pid'] for p in alive]})", file=sys.stderr)
            return Path(state["kubeconfig"])
        print("removing a stale local cluster", file=sys.stderr)
    cluster_down(directory)
    directory.mkdir(parents=True)
    cluster = LocalCluster(directory, detach=True, verbose=True)
    cluster.start()  # on failure the logs stay in `directory` (stop() prints them); `down` removes them
    cluster.write_state(complete=True)
    print(f"local cluster up in {cluster.timings['total']:.1f}s: {cluster.server}", file=sys.stderr)
    return cluster.kubeconfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    if args.action == "up":
        try:
            kubeconfig = cluster_up()
        except (ClusterError, BinariesMissing) as exc:
            print(f"cluster up failed: {exc}", file=sys.stderr)
            return 1
        print(f"KUBECONFIG={kubeconfig}")
        return 0
    if args.action == "down":
        stopped = cluster_down()
        print(f"local cluster stopped ({stopped} processes)")
        return 0
    state = _read_state(BACKGROUND_DIR)
    if state is None:
        print("no local cluster")
        return 1
    alive = _alive_processes(state)
    started = "" if state.get("complete") else " (start-up did not finish: run down)"
    print(f"{len(alive)}/{len(state['processes'])} processes running{started}; KUBECONFIG={state['kubeconfig']}")
    return 0 if state.get("complete") and alive and len(alive) == len(state["processes"]) else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
