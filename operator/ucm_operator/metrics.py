"""The operator's own Prometheus metrics (docs/metrics.md), rendered at scrape time from counters
the reconciler and `Kube` keep anyway, in the text exposition format. No client library: the
operator image carries kopf and kubernetes only, and these few families need none.

- `ucm_operator_reconciles_total{result}`: passes, `ok` or `error` (retried with backoff);
- `ucm_operator_reconcile_duration_seconds`: a histogram of pass durations;
- `ucm_operator_api_requests_total`: every API call, reads included (what a pass costs the API
  server; a no-op resync is 12 reads per cluster and nothing else);
- `ucm_operator_api_writes_total{verb,resource}`: writes, e.g. `PATCH deployments`, `PATCH
  ucmpools/scale` (the autoscaler) or `PATCH ucmclusters/status`;
- `ucm_operator_api_dry_runs_total{verb,resource}`: admission dry runs (persist nothing);
- `ucm_operator_resyncs_total`, `ucm_operator_clusters` (UCMClusters known).
"""

from __future__ import annotations

import bisect
import collections
import http.server
import threading
from collections.abc import Callable, Iterable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class PassStats:
    """Outcomes and durations of reconcile passes (thread-safe; the runtime records each pass)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: collections.Counter[str] = collections.Counter()
        self.bucket_counts = [0] * len(BUCKETS)
        self.count = 0
        self.total_seconds = 0.0

    def record(self, seconds: float, ok: bool) -> None:
        with self._lock:
            self.results["ok" if ok else "error"] += 1
            index = bisect.bisect_left(BUCKETS, seconds)
            if index < len(BUCKETS):
                self.bucket_counts[index] += 1
            self.count += 1
            self.total_seconds += seconds

    def render(self) -> list[str]:
        with self._lock:
            results = dict(self.results)
            buckets, count, total = list(self.bucket_counts), self.count, self.total_seconds
        lines = ["# HELP ucm_operator_reconciles_total Reconcile passes by result (error: retried with backoff).",
                 "# TYPE ucm_operator_reconciles_total counter"]
        lines += [f"ucm_operator_reconciles_total{_labels([('result', r)])} {results.get(r, 0)}" for r in ("ok", "error")]
        lines += ["# HELP ucm_operator_reconcile_duration_seconds Duration of one reconcile pass.",
                  "# TYPE ucm_operator_reconcile_duration_seconds histogram"]
        cumulative = 0
        for bound, n in zip(BUCKETS, buckets, strict=True):
            cumulative += n
            lines.append(f'ucm_operator_reconcile_duration_seconds_bucket{{le="{float(bound)}"}} {cumulative}')
        lines += [f'ucm_operator_reconcile_duration_seconds_bucket{{le="+Inf"}} {count}',
                  f"ucm_operator_reconcile_duration_seconds_sum {total:.6f}",
                  f"ucm_operator_reconcile_duration_seconds_count {count}"]
        return lines


def _by_verb_resource(name: str, help_: str, counts: collections.Counter[str]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
    for key, value in sorted(counts.items()):
        verb, _, resource = key.partition(" ")
        lines.append(f"{name}{_labels([('verb', verb), ('resource', resource)])} {value}")
    return lines


def render(passes: PassStats, writes: collections.Counter[str], dry_runs: collections.Counter[str], calls: int,
           resyncs: int, clusters: int) -> str:
    """The whole exposition text."""
    lines = passes.render()
    lines += ["# HELP ucm_operator_api_requests_total API requests, reads included.",
              "# TYPE ucm_operator_api_requests_total counter", f"ucm_operator_api_requests_total {calls}"]
    lines += _by_verb_resource("ucm_operator_api_writes_total", "API writes by verb and resource.", writes)
    lines += _by_verb_resource("ucm_operator_api_dry_runs_total", "Admission dry runs (persist nothing).", dry_runs)
    lines += ["# HELP ucm_operator_resyncs_total Periodic resyncs of every known UCMCluster.",
              "# TYPE ucm_operator_resyncs_total counter", f"ucm_operator_resyncs_total {resyncs}",
              "# HELP ucm_operator_clusters UCMClusters the operator knows.",
              "# TYPE ucm_operator_clusters gauge", f"ucm_operator_clusters {clusters}"]
    return "\n".join(lines) + "\n"


def serve(address: str, text: Callable[[], str]) -> http.server.ThreadingHTTPServer:
    """GET /metrics on `address` (HOST:PORT) from a daemon thread; returns the server (its
    `server_address` has the port when PORT was 0)."""
    host, _, port = address.rpartition(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return   # a scrape every 30 s is no news

    server = http.server.ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
