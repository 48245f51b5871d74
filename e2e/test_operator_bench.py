"""`ucm-operator bench` itself, at a small scale, so the benchmark cannot rot: several clusters
reach Serving and a full resync of all of them makes no write (the operator's own count; the API
server's count is reported too, but other tests' namespace deletions may share its window)."""

from __future__ import annotations

import pytest
from ucm_operator.bench import run_bench

from e2e.access import ClusterAccess
from e2e.operator_support import install_crd

pytestmark = pytest.mark.e2e


def test_bench_small(cluster: ClusterAccess, monkeypatch: pytest.MonkeyPatch) -> None:
    install_crd(cluster)
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    result = run_bench(clusters=5, timeout=180, workers=4, idle_window=2.0, debounce=0.5)
    print(result)
    assert result["clusters"] == 5 and result["resync_passes"] >= 5
    assert result["noop_resync_operator_writes"] == 0
    assert result["noop_resync_operator_dry_runs"] == 0   # only what would be applied is dry-run
    assert result["writes_to_serving"] >= 5 * 12  # 11 children + a status per cluster, at least
