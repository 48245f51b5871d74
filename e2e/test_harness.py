"""Tests of the control-plane harness itself: version pins, simulated nodes, and that start-up
failures and a killed owner leave no process behind. The first group needs no binaries; the
`e2e` ones start real components."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import e2e.cluster as cluster_module
from e2e import binaries
from e2e.cluster import KEPT_FILE, ClusterStartError, LocalCluster, sweep_orphaned_workdirs
from e2e.nodes import GPU_PRODUCT_LABEL, GPU_RESOURCE, GPU_TAINT, H100, L40S, build_nodes
from e2e.processes import pid_runs, process_status, stop_group
from e2e.wait import wait_for

REPO = Path(__file__).resolve().parent.parent


def test_versions_file_errors_name_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    bad_line = tmp_path / "versions.env"
    bad_line.write_text("KUBERNETES_VERSION=v1.36.3\nnot a pin\n")
    with pytest.raises(ValueError, match=r"versions\.env:2: expected KEY=VALUE"):
        binaries.versions(bad_line)
    missing = tmp_path / "missing.env"
    missing.write_text("# only one pin\nKUBERNETES_VERSION=v1.36.3\n")
    with pytest.raises(ValueError, match=r"missing\.env: missing version pin\(s\) ETCD_VERSION, KWOK_VERSION, HELM_VERSION"):
        binaries.versions(missing)


def test_python_and_build_script_agree_on_the_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCM_BIN_CACHE", str(tmp_path))
    script = subprocess.run(
        ["bash", str(binaries.BUILD_SCRIPT), "--print-dir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert script == str(binaries.bin_dir())
    assert Path(script).parent == tmp_path
    pins = binaries.versions()
    assert pins["KUBERNETES_VERSION"] in script and pins["HELM_VERSION"] in script


def test_missing_binaries_name_the_command_that_builds_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCM_BIN_CACHE", str(tmp_path))
    with pytest.raises(binaries.BinariesMissing, match=r"kube-apiserver, .*helm.*make bins"):
        binaries.bin_dir(require=True)


def test_simulated_nodes_model_two_gpu_products_and_a_cpu_node() -> None:
    nodes = build_nodes()
    by_product: dict[str | None, list[dict[str, object]]] = {}
    for node in nodes:
        by_product.setdefault(node["metadata"]["labels"].get(GPU_PRODUCT_LABEL), []).append(node)
    assert {p: len(n) for p, n in by_product.items()} == {H100: 2, L40S: 2, None: 1}
    for product, gpus in ((H100, "8"), (L40S, "4")):
        for node in by_product[product]:
            assert node["status"]["allocatable"][GPU_RESOURCE] == gpus  # type: ignore[index]
            assert node["spec"]["taints"] == [GPU_TAINT]  # type: ignore[index]
    cpu = by_product[None][0]
    assert GPU_RESOURCE not in cpu["status"]["allocatable"] and not cpu["spec"]  # type: ignore[index, operator]
    addresses = [n["status"]["addresses"][0]["address"] for n in nodes]
    assert len(set(addresses)) == len(nodes)


class _BrokenApiserver(LocalCluster):
    def _apiserver_argv(self, pki):  # type: ignore[no-untyped-def]
        return [*super()._apiserver_argv(pki), "--no-such-flag"]


@pytest.mark.e2e
def test_failed_start_names_the_component_keeps_its_log_and_leaves_no_process() -> None:
    cluster = _BrokenApiserver()
    with pytest.raises(ClusterStartError, match=r"kube-apiserver exited with code \d+") as failure:
        cluster.start(timeout_s=60)
    log = cluster.workdir / "logs" / "kube-apiserver.log"
    assert str(log) in str(failure.value)
    assert "unknown flag: --no-such-flag" in log.read_text()
    assert (cluster.workdir / KEPT_FILE).exists()
    assert cluster.components and all(c.exited() is not None for c in cluster.components)
    # Kept on purpose, so the sweep of orphaned directories must leave it alone.
    assert cluster.workdir not in sweep_orphaned_workdirs()
    subprocess.run(["rm", "-rf", str(cluster.workdir)], check=True)


OWNER = """
import json, sys, time
from e2e.cluster import LocalCluster
c = LocalCluster().start()
print(json.dumps({"workdir": str(c.workdir), "ports": list(c.ports.values()),
                  "pids": {x.pid: x.argv[0] for x in c.components}}), flush=True)
time.sleep(600)
"""


def _listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    return bool(out.strip())


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_owner_killed_leaves_no_process_or_port(sig: signal.Signals) -> None:
    """SIGKILL: the kernel kills the components (PR_SET_PDEATHSIG). SIGTERM: the harness tears
    down in order through atexit. Either way nothing keeps running or listening."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
        pids = {int(pid): exe for pid, exe in info["pids"].items()}
        assert len(pids) == 5 and all(pid_runs(pid, exe) for pid, exe in pids.items())
        owner.send_signal(sig)
        owner.wait(timeout=30)
        wait_for(lambda: not any(pid_runs(pid, exe) for pid, exe in pids.items()), "components to exit", timeout_s=15)
        ports = [p for p in info["ports"] if p != 0]
        wait_for(lambda: not any(_listening(p) for p in ports), f"ports {ports} to close", timeout_s=10)
        workdir = Path(info["workdir"])
        if sig == signal.SIGKILL:
            assert workdir.exists()  # nobody could delete it ...
            assert workdir in sweep_orphaned_workdirs()  # ... so the next cluster start does
        assert not workdir.exists()  # after SIGTERM, atexit removed it
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


@pytest.mark.e2e
def test_a_port_taken_before_a_component_binds_it_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_port = cluster_module.free_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        handed_out = iter([taken])  # the first port asked for (etcd's client port) is busy
        monkeypatch.setattr(cluster_module, "free_port", lambda: next(handed_out, None) or real_free_port())
        with LocalCluster() as cluster:
            assert cluster.ports["etcd-client"] != taken
            assert "Ready" in cluster.kubectl("get", "nodes", "cpu-0").stdout


def test_stop_group_kills_what_ignores_sigterm_and_says_what_it_was_doing() -> None:
    """The report a slow teardown prints: SIGKILL after the grace, then each thread's state."""
    ignores = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                                "time.sleep(120)"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert ignores.stdout is not None and ignores.stdout.readline() == "ready\n"
    stopped = stop_group(ignores, grace_s=0.5)
    assert stopped.killed and stopped.exit_code == -signal.SIGKILL
    assert " S " in stopped.threads, stopped.threads  # asleep, interruptibly: a Python-level wait
    assert "killed (SIGKILL)" in stopped.describe()
    ignores.stdout.close()
    assert stop_group(ignores, grace_s=30).describe() == "had already exited (-9)"

    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    stopped = stop_group(polite, grace_s=30)
    assert not stopped.killed and stopped.exit_code == -signal.SIGTERM and stopped.threads == ""


def test_stop_group_reaps_a_child_whose_popen_wait_cannot() -> None:
    """`Popen.wait` reaps only while it holds Popen's private lock; with that lock held elsewhere,
    a child that exited on SIGTERM stays a zombie. stop_group reaps it with a plain waitpid,
    without SIGKILL, and says so."""
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    lock = polite._waitpid_lock  # type: ignore[attr-defined]
    assert lock.acquire(blocking=False)
    try:
        stopped = stop_group(polite, grace_s=1.0)
    finally:
        lock.release()
    assert stopped.reaped_directly and not stopped.killed, stopped.describe()
    assert stopped.exit_code == -signal.SIGTERM == polite.returncode
    assert stopped.unreaped.startswith("State Z (zombie)"), stopped.unreaped
    assert "exited (-15)" in stopped.describe() and "a plain waitpid did" in stopped.describe()
    with pytest.raises(ChildProcessError):  # reaped: no such child any more
        os.waitpid(polite.pid, os.WNOHANG)


_TRACER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_SEIZE = 0x4206
if libc.ptrace(PTRACE_SEIZE, int(sys.argv[1]), None, None) != 0:
    print("errno", ctypes.get_errno(), flush=True)
    sys.exit(1)
print("seized", flush=True)
time.sleep(120)  # never waits for its tracee: the tracee's stops and its exit wait on this process
"""


def test_stop_group_reports_a_traced_child_as_a_zombie_it_cannot_reap() -> None:
    """A child traced by another process (a debugger, a sandbox that traces everything) stops at
    SIGTERM until its tracer lets it go, and after SIGKILL it is a zombie that only the tracer can
    release. stop_group reports that (state, TracerPid) instead of calling it running."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    tracer = subprocess.Popen([sys.executable, "-c", _TRACER, str(child.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout is not None
        answer = tracer.stdout.readline().strip()
        if answer != "seized":
            pytest.skip(f"cannot ptrace a child here ({answer}; child: {process_status(child.pid)})")
        stopped = stop_group(child, grace_s=1.0, kill_wait_s=2.0)
        assert stopped.killed and stopped.exit_code is None and stopped.zombie, stopped.describe()
        assert f"TracerPid {tracer.pid}" in stopped.unreaped
        assert " t " in stopped.threads, stopped.threads  # stopped by its tracer at SIGTERM's delivery
        assert stopped.describe().startswith("exited but still not reaped")
    finally:
        tracer.kill()
        tracer.wait()
        if tracer.stdout is not None:
            tracer.stdout.close()
        child.kill()
    assert child.wait(timeout=10) == -signal.SIGKILL  # the tracer gone, the parent reaps it
