"""The reconciler's store scrape against real HTTP endpoints on loopback (no API server): which
pods it reads, how often, what a pass shows in between, and how a pod that does not answer is
reported."""

from __future__ import annotations

import http.server
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
from ucm_operator.reconcile import Outcome, Reconciler
from ucm_operator.signals import fetch_each, worker_metric_urls

METRICS = """# TYPE vllm:ucm_store_used_bytes gauge
vllm:ucm_store_used_bytes{engine="0",model_name="m"} 4096.0
vllm:ucm_store_blocks{engine="0",model_name="m"} 2.0
vllm:ucm_store_capacity_bytes{engine="0",model_name="m"} 16384.0
vllm:ucm_store_evictions{engine="0",model_name="m"} 0.0
vllm:ucm_store_read_only_errno{engine="0",model_name="m"} 0.0
vllm:ucm_store_unreachable_seconds{engine="0",model_name="m"} 0.0
vllm:ucm_lookup_tokens_total{engine="0",model_name="m"} %d
vllm:ucm_hit_tokens_total{engine="0",model_name="m"} %d
"""


class Worker:
    """A /metrics endpoint whose counters the test moves; counts the reads it serves."""

    def __init__(self) -> None:
        self.lookups = self.hits = self.reads = 0
        worker = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                worker.reads += 1
                body = (METRICS % (worker.lookups, worker.hits)).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.server.shutdown()
    w.server.server_close()


SPEC: Any = types.SimpleNamespace(namespace="ns", name="c")


def test_scrapes_at_most_every_interval_and_shows_the_last_reading_between(worker: Worker) -> None:
    r = Reconciler(kube=None, worker_metrics_urls=[worker.url], store_scrape_seconds=0.5)  # type: ignore[arg-type]
    worker.lookups, worker.hits = 100, 10
    first = r._store_usage(SPEC, [], outcome := Outcome())
    assert first is not None and worker.reads == 1
    assert first.usage["usedPercent"] == "25.0%" and "hitRate" not in first.usage  # no window yet
    assert first.condition["status"] == "True"
    assert outcome.requeue_after is not None and 0.1 <= outcome.requeue_after <= 0.5
    worker.lookups, worker.hits = 300, 160
    again = r._store_usage(SPEC, [], Outcome())
    assert again is first and worker.reads == 1  # within the interval: no read, same reading
    time.sleep(0.55)
    later = r._store_usage(SPEC, [], Outcome())
    assert later is not None and worker.reads == 2
    assert later.usage["hitRate"] == "75.0%" and later.usage["lookupTokens"] == 200


def test_off_means_no_reading_and_no_timer(worker: Worker) -> None:
    r = Reconciler(kube=None, worker_metrics_urls=[worker.url], store_scrape_seconds=0)  # type: ignore[arg-type]
    outcome = Outcome()
    assert r._store_usage(SPEC, [], outcome) is None and outcome.requeue_after is None and worker.reads == 0


def pod(name: str, role: str, ip: str | None, ready: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"ucm.dev/role": role}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_reads_ready_worker_pods_only_and_rereads_when_one_turns_ready() -> None:
    pods = [pod("p-0", "prefill", "10.0.0.4"), pod("d-0", "decode", "fd00::7"), pod("d-1", "decode", "10.0.0.5", False),
            pod("r-0", "router", "10.0.0.6")]
    assert worker_metric_urls("ns", "c", pods, ()) == {"d-0": "http://[fd00::7]:8000/metrics",
                                                       "p-0": "http://10.0.0.4:8000/metrics"}
    assert worker_metric_urls("ns", "c", pods, ["http://h/{namespace}/{name}"]) == {"http://h/ns/c": "http://h/ns/c"}
    r = Reconciler(kube=None, store_scrape_seconds=300)  # type: ignore[arg-type]
    first = r._store_usage(SPEC, [], Outcome())
    assert first is not None and first.condition["reason"] == "NoWorkers"
    # A pod turning Ready is read at once, not 300 s later (here: nothing listens, so it is unread).
    closed = pod("d-0", "decode", "127.0.0.254")
    second = r._store_usage(SPEC, [closed], Outcome())
    assert second is not first and second is not None
    assert second.condition["reason"] == "MetricsUnavailable" and "d-0" in second.condition["message"]


def test_unanswering_pods_are_reported_each_by_name() -> None:
    import socket

    silent = [socket.socket() for _ in range(3)]
    for s in silent:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # accepts the connection, never answers
    try:
        urls = {f"p{i}": f"http://127.0.0.1:{s.getsockname()[1]}/metrics" for i, s in enumerate(silent)}
        bodies, errors = fetch_each(urls, timeout=0.3)
    finally:
        for s in silent:
            s.close()
    assert bodies == {} and sorted(errors) == ["p0", "p1", "p2"]
    assert all(e.startswith(urls[p]) and "timed out" in e for p, e in errors.items()), errors
