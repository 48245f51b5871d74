"""The operator's /metrics parses as Prometheus text and counts what happened; every metric the
shipped Grafana dashboard queries is one that something exports, and docs/metrics.md names them all."""

from __future__ import annotations

import ast
import collections
import json
import re
import urllib.request
from typing import Any

from operator_helpers import ROOT
from prometheus_client.parser import text_string_to_metric_families
from ucm_operator.metrics import PassStats, render, serve

DASHBOARD = ROOT / "charts" / "ucm" / "files" / "grafana-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"


def operator_text() -> str:
    passes = PassStats()
    passes.record(0.03, ok=True)
    passes.record(7.0, ok=False)
    passes.record(99.0, ok=True)      # past the last bucket: only +Inf, sum and count
    writes = collections.Counter({"PATCH deployments": 3, "PATCH ucmpools/scale": 2})
    return render(passes, writes, collections.Counter({"PATCH deployments": 1}), calls=40, resyncs=2, clusters=1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_operator_metrics_are_valid_exposition_with_the_counts() -> None:
    found = samples(operator_text())
    assert found[("ucm_operator_reconciles_total", (("result", "ok"),))] == 2
    assert found[("ucm_operator_reconciles_total", (("result", "error"),))] == 1
    assert found[("ucm_operator_reconcile_duration_seconds_bucket", (("le", "0.05"),))] == 1
    assert found[("ucm_operator_reconcile_duration_seconds_bucket", (("le", "10.0"),))] == 2
    assert found[("ucm_operator_reconcile_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert found[("ucm_operator_reconcile_duration_seconds_count", ())] == 3
    assert found[("ucm_operator_api_writes_total", (("resource", "ucmpools/scale"), ("verb", "PATCH")))] == 2
    assert found[("ucm_operator_api_dry_runs_total", (("resource", "deployments"), ("verb", "PATCH")))] == 1
    assert found[("ucm_operator_api_requests_total", ())] == 40
    assert found[("ucm_operator_clusters", ())] == 1


def test_metrics_are_served_over_http() -> None:
    server = serve("127.0.0.1:0", operator_text)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "ucm_operator_resyncs_total 2" in response.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def declared_families() -> dict[str, str]:
    """name -> type of every family the router and the operator declare (# TYPE lines: a labelled
    family without children has no samples yet)."""
    from ucm.router.endpoints import Registry
    from ucm.router.metrics import RouterMetrics

    found: dict[str, str] = {}
    for text in (RouterMetrics(Registry()).render().decode(), operator_text()):
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            if not name.endswith("_created"):
                found[name] = kind
    return found


def exported_names() -> set[str]:
    """Every series name something in the repository exports, as Prometheus sees it."""
    names = set()
    for name, kind in declared_families().items():
        names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    # The connector's names, read from its source (importing it needs vLLM's metrics module).
    source = ast.parse((ROOT / "ucm" / "connector" / "stats.py").read_text())
    def tuple_named(name: str) -> list[str]:
        node = next(n.value for n in ast.walk(source) if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))
        assert isinstance(node, ast.Tuple)
        return [ast.literal_eval(e) for e in node.elts]

    names |= {f"vllm:ucm_{c}_total" for c in tuple_named("COUNTERS")}
    names |= {f"vllm:ucm_{g}" for g in ("load_gbps", "save_gbps", "hit_rate", *tuple_named("GAUGES"))}
    # gauges named literally in the source (the store probe's)
    names |= {n.value for n in ast.walk(source) if isinstance(n, ast.Constant) and isinstance(n.value, str)
              and re.fullmatch(r"vllm:ucm_[a-z_]+", n.value)}
    return names


def dashboard_queries() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return queries


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    known = exported_names()
    used = {m for q in dashboard_queries() for m in re.findall(r"\b(?:vllm:)?ucm_[a-z_:]+", q)
            if not m.startswith("ucm_dev_")}   # ucm_dev_*: the pods' labels, not metrics
    assert len(used) >= 15
    assert used <= known, sorted(used - known)
    # Each panel filters by the UCMCluster variable (podTargetLabels make ucm.dev/cluster a label).
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert all('ucm_dev_cluster=~"$cluster"' in t["expr"] for p in panels for t in p["targets"])


def test_docs_name_every_router_and_operator_metric() -> None:
    doc = METRICS_DOC.read_text()
    families = declared_families()
    assert len(families) >= 20
    missing = sorted(f for f in families if f"`{f}`" not in doc)
    assert not missing, missing
