"""`make demo`, run the way a user runs it: as a process, non-interactively and with Ctrl-C.

Each run starts its own control plane, installs the chart, runs the operator under the chart's
ServiceAccount and waits for the heterogeneous example to be Serving; the test then checks what
it printed (placement on the right GPU products, the explore commands) and that nothing it
started is still running afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from e2e.ucm_demo.cluster import leftover_processes
from e2e.ucm_demo.view import build_snapshot, is_serving, render_progress

REPO = Path(__file__).resolve().parents[1]


def _start_demo(**env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "e2e.ucm_demo"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **env))


def _check_output_and_cleanup(output: str) -> None:
    """Placement and teardown as the demo reported them; on failure, the demo's output says why."""
    try:
        _check(output)
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n--- demo output (tail) ---\n{output[-5000:]}") from None
    # A teardown that went on despite a slow or odd exit passes, but says so in pytest's summary.
    for line in output.splitlines():
        if "WARNING:" in line:
            warnings.warn(f"make demo printed: {line.strip()}", UserWarning, stacklevel=2)


def _check(output: str) -> None:
    workdir = Path(re.search(r"UCM demo \(work directory (\S+)\)", output).group(1))  # type: ignore[union-attr]
    kubeconfig_line = re.search(r"KUBECONFIG=(\S+)", output)
    assert kubeconfig_line
    # Placement: prefill pods on H100 nodes, decode pods on L40S nodes, router on the CPU node.
    # Only the topology table: the live progress lines above it can have as many columns.
    topology = output[output.index("Topology of"):output.index("Explore it")]
    rows = re.findall(r"^\s+(prefill|decode|router)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", topology, re.M)
    roles = {row[0]: row[3] for row in rows}
    assert roles.get("prefill") == "NVIDIA-H100-80GB-HBM3"
    assert roles.get("decode") == "NVIDIA-L40S"
    assert sum(1 for row in rows if row[0] == "decode") == 2, "the example asks for 2 decode replicas"
    assert "Serving=True" in output
    assert f"export KUBECONFIG={kubeconfig_line.group(1)}" in output
    # The garbage collector removes the children; how soon depends on its periodic discovery of the
    # new CRD, so the demo may move on (the control plane goes down next) before it is done.
    assert "deleting UCMCluster" in output
    assert ("all Deployments and pods of the UCMCluster are gone" in output
            or "still there after 90s (the control plane goes down next anyway)" in output)
    assert "demo finished: nothing left running" in output
    # Nothing left: no process mentions the work directory, the API server's port is closed,
    # and the work directory itself is gone.
    left = leftover_processes(workdir)
    assert left == [], f"still running: {left}"
    assert not workdir.exists()


def _api_port_closed(output: str) -> None:
    match = re.search(r"server: (https://127\.0\.0\.1:\d+)", output)
    if match:
        port = urlparse(match.group(1)).port
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port or 0)) != 0, "the demo's API server still listens"


@pytest.mark.e2e
def test_demo_exits_when_serving_and_leaves_nothing_running() -> None:
    proc = _start_demo(UCM_DEMO_EXIT_WHEN_SERVING="1")
    try:
        output, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"make demo did not finish in 540s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    _check_output_and_cleanup(output)
    _api_port_closed(output)
    # The operator's own prefill/decode commands, run locally, answered through the router, and the
    # second turn's prompt came from the store.
    assert "standing in for those pods" in output
    answers = re.findall(r"^\s+A: (.*\S.*)$", output, re.M)
    assert len(answers) == 2, output[-4000:]
    loaded = re.search(r"the prefill side loaded (\d+) prompt tokens from the store", output)
    assert loaded and int(loaded.group(1)) >= 1024, output[-4000:]  # turn 1's ~1,500-token prompt


@pytest.mark.e2e
def test_demo_runs_until_ctrl_c_then_tears_down() -> None:
    proc = _start_demo()
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 540
    for line in proc.stdout:
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
        assert time.monotonic() < deadline, "no Serving within 540s:\n" + "".join(lines[-80:])
    else:
        pytest.fail("the demo ended before it was Serving:\n" + "".join(lines[-80:]))
    time.sleep(2)  # still running, nothing torn down yet
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=240)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-6000:]
    assert "Ctrl-C: tearing down" in output
    _check_output_and_cleanup(output)


def test_progress_view_reads_the_status_a_user_sees() -> None:
    """The view is pure; this pins what "Serving" means to the demo (fresh observedGeneration)."""
    cr = yaml.safe_load("""
    metadata: {name: llama-pd, namespace: demo, generation: 2}
    status:
      observedGeneration: 1
      revision: abc123
      pools: [{name: h100, role: prefill, desired: 1, ready: 1, updated: 1}]
      conditions:
        - {type: Serving, status: "True"}
        - {type: PrefillReady, status: "False", reason: NoReadyPods}
    """)
    assert not is_serving(cr), "a Serving=True from an older generation is stale"
    cr["status"]["observedGeneration"] = 2
    assert is_serving(cr)
    pods = [{"metadata": {"name": "llama-pd-h100-x", "labels": {"ucm.dev/role": "prefill", "ucm.dev/pool": "h100"}},
             "spec": {"nodeName": "gpu-h100-0"},
             "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "llama-pd-l40s-y", "labels": {"ucm.dev/role": "decode", "ucm.dev/pool": "l40s"}},
             "spec": {}, "status": {"phase": "Pending", "conditions": [
                 {"type": "PodScheduled", "status": "False", "message": "0/5 nodes are available"}]}}]
    nodes = [{"metadata": {"name": "gpu-h100-0", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}]
    text = render_progress(build_snapshot(cr, pods, nodes))
    assert "pool prefill/h100: ready 1/1" in text
    assert "on gpu-h100-0 (NVIDIA-H100-80GB-HBM3)" in text
    assert "unscheduled: 0/5 nodes are available" in text
    assert "-PrefillReady(NoReadyPods)" in text and "+Serving" in text
