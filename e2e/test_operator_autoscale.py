"""spec.autoscaling against the real control plane, with a real router process as the signal:

- fake vLLM upstreams (ucm.bench.fake_upstreams) stream slowly, and a real `ucm router serve` in front
  of them holds N client streams in flight, which its own /metrics reports as
  `ucm_router_inflight_requests`;
- the operator (a subprocess under the chart's RBAC, `--router-metrics-url` pointing at that router,
  since this operator cannot reach pod IPs) scales decode to ceil(N / targetInflightPerDecode) and
  prefill with it at the ratio, through the UCMPools' /scale;
- then, at once, the load goes and an engine change rolls every pool to a new revision: the pools
  scale back in after the down-window, and `Serving` (polled every 200 ms) never turns False.

Printed: seconds from the load being in flight to the scaled pools being Ready, and the operator's
API writes for that decision. Not shown here: real vLLM pods behind the router, and a real drain
(the pods are kwok's; the router's EndpointSlice handling of terminating pods is tested elsewhere).
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from ucm_operator.kube import Kube

from e2e.access import ClusterAccess
from e2e.cluster import free_port
from e2e.operator_support import API, apply_cluster, condition, get_cluster, load_example, running_operator
from e2e.processes import stop_group
from e2e.wait import wait_for

pytestmark = pytest.mark.e2e
MODEL = "fake-model"
NAME = "auto"
PASS_LINE = re.compile(r"reconciled \S+: applied (\d+), pruned (\d+), status (\w+), pool statuses (\d+), "
                       r"events (\d+), scaled (\d+)")


class Stack:
    """Fake upstreams and a real router on loopback; `port` is the router's."""

    def __init__(self, tmp_path: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        fake = self._spawn([sys.executable, "-m", "ucm.bench.fake_upstreams", "--prefill", "1", "--decode", "1",
                            "--tokens", "100000", "--token-delay-s", "0.05", "--model", MODEL], tmp_path / "fake.log",
                           stdout=True)
        assert fake.stdout is not None
        urls = json.loads(fake.stdout.readline())
        router = self._spawn([sys.executable, "-m", "ucm", "router", "serve", "--host", "127.0.0.1", "--port", "0",
                              "--model", MODEL, "--prefill", urls["prefill"][0], "--decode", urls["decode"][0]],
                             tmp_path / "router.log", stderr=True)
        assert router.stderr is not None
        port = None
        while port is None:
            line = router.stderr.readline().decode()
            assert line, "the router exited before listening"
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        self.port = port
        # Keep reading its log, or a full pipe would block the router.
        threading.Thread(target=self._drain, args=(router.stderr, tmp_path / "router.log"), daemon=True).start()

    def _spawn(self, argv: list[str], log: Path, stdout: bool = False, stderr: bool = False) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        self.logs.append(out)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if stdout else out,
                                stderr=subprocess.PIPE if stderr else out, start_new_session=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _drain(stream: IO[bytes], log: Path) -> None:
        with log.open("ab") as out:
            for line in stream:
                out.write(line)

    def inflight(self) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        found = re.search(r"^ucm_router_inflight_requests (\S+)$", text, re.M)
        assert found, text[:2000]
        return float(found.group(1))

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc, grace_s=10)
        for log in self.logs:
            log.close()


class Load:
    """`n` streaming completions held open through the router (read in the background)."""

    def __init__(self, port: int, n: int) -> None:
        self.conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(n)]
        body = json.dumps({"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 100000})
        for conn in self.conns:
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200, response.read()[:500]
            threading.Thread(target=self._read, args=(response,), daemon=True).start()

    @staticmethod
    def _read(response: http.client.HTTPResponse) -> None:
        try:
            while response.read1(4096):
                pass
        except Exception:  # stop() closes the socket under it; http.client then raises anything
            pass

    def stop(self) -> None:
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.shutdown(2)
            conn.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path)
    try:
        yield running
    finally:
        running.close()


def sizes(kube: Kube, namespace: str) -> dict[str, Any]:
    body = get_cluster(kube, namespace, NAME) or {}
    status = body.get("status") or {}
    pools = {p["name"]: p for p in status.get("pools") or []}
    return {"prefill": status.get("prefill"), "decode": status.get("decode"), "pools": pools,
            "serving": condition(body, "Serving").get("status"),
            "progressing": condition(body, "Progressing").get("status"),
            "revision": status.get("revision"), "autoscaling": status.get("autoscaling")}


def at(kube: Kube, namespace: str, prefill: str, decode: str, revision: str | None = None) -> dict[str, Any] | None:
    now = sizes(kube, namespace)
    ok = (now["prefill"] == prefill and now["decode"] == decode and now["serving"] == "True"
          and now["progressing"] == "False" and (revision is None or now["revision"] == revision))
    return now if ok else None


def test_router_load_scales_decode_and_prefill_at_the_ratio_and_back_through_a_rollout(
        cluster: ClusterAccess, namespace: str, kube: Kube, crd: None, tmp_path: Path, stack: Stack) -> None:
    body = load_example("ucmcluster-heterogeneous.yaml", name=NAME, namespace=namespace)
    body["spec"]["decode"][0]["replicas"] = 1
    body["spec"]["autoscaling"] = {
        "pools": [{"name": "h100", "minReplicas": 1, "maxReplicas": 4}, {"name": "l40s", "minReplicas": 1, "maxReplicas": 6}],
        "ratio": {"prefill": 1, "decode": 2}, "targetInflightPerDecode": 2, "intervalSeconds": 1,
        "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 4}
    url = f"http://127.0.0.1:{stack.port}/metrics"
    metrics_port = free_port()
    with running_operator(cluster, namespace, tmp_path / "op", extra_args=(
            "--router-metrics-url", url, "--metrics-address", f"127.0.0.1:{metrics_port}")) as operator:
        apply_cluster(cluster, namespace, body)
        idle = wait_for(lambda: at(kube, namespace, "1/1", "1/1"), "idle at 1 prefill + 1 decode", timeout_s=120)
        assert idle["autoscaling"]["inflight"] == 0 and idle["autoscaling"]["decode"] == 1, idle

        # 8 streams in flight / 2 per decode pod -> 4 decode; 1:2 -> 2 prefill.
        mark = len(operator.log())
        load = Load(stack.port, 8)
        try:
            wait_for(lambda: stack.inflight() == 8, "8 requests in flight at the router", timeout_s=30)
            start = time.monotonic()
            scaled = wait_for(lambda: at(kube, namespace, "2/2", "4/4"), "scaled to 2 prefill + 4 decode",
                              timeout_s=90)
            scaled_s = time.monotonic() - start
            assert scaled["autoscaling"]["inflight"] == 8
            for pool, replicas in (("auto-h100", 2), ("auto-l40s", 4)):
                scaler = kube.get(API, "UCMPool", namespace, pool)
                assert scaler is not None and scaler["spec"]["replicas"] == replicas
                assert {f["manager"] for f in scaler["metadata"]["managedFields"]
                        if "f:replicas" in (f.get("fieldsV1") or {}).get("f:spec", {})} == {"ucm-operator-autoscaler"}
            writes = {"decisions": 0, "scale": 0, "applied": 0, "statuses": 0}
            for line in operator.lines_since(mark):
                if "autoscaled pool" in line:
                    writes["scale"] += 1
                if (m := PASS_LINE.search(line)):
                    writes["decisions"] += int(int(m.group(6)) > 0)
                    writes["applied"] += int(m.group(1))
                    writes["statuses"] += int(m.group(3) == "written") + int(m.group(4))
            print(f"load 0->8 in flight: {scaled_s:.2f}s to 2+4 pods Ready; operator writes {writes}")
            # Every /scale write is answered by one Deployment apply; the two pools' PDBs (2+ pods) are new.
            assert writes["scale"] >= 2 and writes["applied"] == writes["scale"] + 2, writes

            # Now, at once: the load goes, and an engine change rolls every pool to a new revision.
            failures: list[dict[str, Any]] = []
            polling = threading.Event()

            def poll() -> None:
                while not polling.is_set():
                    now = sizes(kube, namespace)
                    if now["serving"] != "True":
                        failures.append(now)
                    time.sleep(0.2)
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            old_revision = scaled["revision"]
            body["spec"]["engine"]["extraArgs"] = [*body["spec"]["engine"].get("extraArgs", []), "--max-num-seqs", "64"]
        finally:
            load.stop()
        try:
            apply_cluster(cluster, namespace, body)
            wait_for(lambda: stack.inflight() == 0, "the router's streams to end", timeout_s=30)
            back = wait_for(lambda: (s := at(kube, namespace, "1/1", "1/1")) and s["revision"] != old_revision and s,
                            "back to 1 prefill + 1 decode on the new revision", timeout_s=120)
        finally:
            polling.set()
            poller.join()
        assert failures == [], f"Serving was not True during the rollout and scale-in: {failures[:3]}"
        assert back["autoscaling"]["inflight"] == 0

        # The operator's own /metrics counts the autoscaler's /scale writes (up, then down).
        conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        found = re.search(r'^ucm_operator_api_writes_total\{verb="PATCH",resource="ucmpools/scale"\} (\d+)$', text, re.M)
        assert found and int(found.group(1)) >= 4, text
        assert re.search(r'^ucm_operator_reconciles_total\{result="ok"\} [1-9]', text, re.M), text
