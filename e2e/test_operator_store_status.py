"""status.store and StoreHealthy from a real worker: a real `vllm serve` (CPU build, tiny Llama,
UCMConnector) on loopback, its store on a 2 MiB tmpfs, and the operator (a subprocess on the real
control plane, `--worker-metrics-url` pointing at that server, since it cannot reach kwok's pod IPs)
reading its /metrics every second.

- before any request the worker has not reported (StoreHealthy Unknown, not an empty store); after
  one, the status shows the blocks and bytes really on the tmpfs, and `kubectl get` shows them;
- the same prompt again is a store hit, and the status's hit rate is that request's (100% of the
  whole blocks the scheduler asked the store about);
- distinct prompts fill the tmpfs: the worker's store turns read-only on a real ENOSPC and
  StoreHealthy turns False naming it, while the server keeps answering.

Not shown: reading pod IPs (kwok's pods run nothing; tests/operator/test_operator_store_scrape.py
covers which pods are read) and an NFS server going away (tests/connector/test_store_probe.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ucm_operator.kube import Kube

from e2e.access import ClusterAccess
from e2e.operator_support import apply_cluster, condition, get_cluster, load_example, running_operator
from e2e.wait import wait_for
from ucm.serve.models import prepare
from ucm.serve.server import VllmServer, ucm_transfer_config

pytestmark = [pytest.mark.e2e, pytest.mark.serving, pytest.mark.timeout(900)]
NAME = "stored"
BLOCK = 128  # the CPU backend's KV block size
CAPACITY = 8 << 20  # above the tmpfs's 2 MiB: the disk fills before the store would evict


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A 2 MiB tmpfs for the store when this machine lets us mount one (root); else a directory."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], capture_output=True, check=False).returncode == 0
    try:
        yield point / "store", mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def complete(server: VllmServer, tokens: list[int]) -> list[int]:
    reply = httpx.post(server.url + "/v1/completions", timeout=300, json={
        "model": "model", "prompt": tokens, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True})
    reply.raise_for_status()
    return list(reply.json()["choices"][0]["token_ids"])


def prompt(seed: int, blocks: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 900 + 10 for i in range(blocks * BLOCK + 20)]


def store_of(kube: Kube, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = get_cluster(kube, namespace, NAME) or {}
    return dict((body.get("status") or {}).get("store") or {}), condition(body, "StoreHealthy")


def on_disk(root: Path) -> tuple[int, int]:
    """Objects and their bytes under the store's root, as the kernel sees them."""
    files = [p for p in (root / "objects").rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    return len(files), sum(p.stat().st_size for p in files)


def test_store_usage_hit_rate_and_read_only_reach_the_status(
        cluster: ClusterAccess, namespace: str, kube: Kube, crd: None, tmp_path: Path,
        store_dir: tuple[Path, bool]) -> None:
    root, mounted = store_dir
    server = VllmServer(model=prepare("tiny-llama"), log_dir=tmp_path, name="worker",
                        kv_transfer_config=ucm_transfer_config("kv_both", root, "tiny-llama", capacity_bytes=CAPACITY))
    body = load_example("ucmcluster-heterogeneous.yaml", name=NAME, namespace=namespace)
    with server, running_operator(cluster, namespace, tmp_path / "op", extra_args=(
            "--worker-metrics-url", server.url + "/metrics", "--store-scrape-seconds", "1")):
        apply_cluster(cluster, namespace, body)
        store, healthy = wait_for(lambda: (s := store_of(kube, namespace))[1].get("status") and s,
                                  "StoreHealthy in the status", timeout_s=120)
        # A worker reports its store with its first step: until then it is not read as empty.
        assert (healthy["status"], healthy["reason"]) == ("Unknown", "NotReported") and store == {}, (store, healthy)

        first = prompt(1, 2)
        answer = complete(server, first)
        store, healthy = wait_for(lambda: (s := store_of(kube, namespace))[0].get("blocks", 0) >= 2 and s,
                                  "the first prompt's 2 blocks in status.store", timeout_s=60)
        assert (healthy["status"], healthy["reason"]) == ("True", "Writable"), healthy
        assert store["capacityBytes"] == CAPACITY and store["reportingPods"] == 1, store
        blocks, nbytes = on_disk(root)
        assert (store["blocks"], store["usedBytes"]) == (blocks, nbytes), (store, blocks, nbytes)
        assert store["usedPercent"] == f"{100 * nbytes / CAPACITY:.1f}%"
        table = cluster.kubectl("get", "ucmcluster", NAME, "-n", namespace).stdout
        assert "STORE-USED" in table and store["usedPercent"] in table, table

        # The same prompt again: the store is asked about its 2 whole blocks (256 of 276 tokens) and
        # has both.
        assert complete(server, first) == answer
        seen = wait_for(lambda: (s := store_of(kube, namespace)[0]).get("hitRate") and s, "a hit rate in status.store",
                        timeout_s=60, interval_s=0.1)
        assert (seen["hitRate"], seen["lookupTokens"]) == ("100.0%", 2 * BLOCK), seen
        print(f"status.store after a repeat: {seen}")

        if not mounted:
            pytest.skip("no tmpfs here (needs root and mount): the ENOSPC part needs a small real filesystem")
        # Distinct prompts until the 2 MiB tmpfs refuses a write (each block is 256 KiB).
        for seed in range(2, 8):
            complete(server, prompt(seed, 3))
        _, healthy = wait_for(lambda: (s := store_of(kube, namespace))[1].get("status") == "False" and s,
                              "StoreHealthy False after ENOSPC", timeout_s=60)
        assert healthy["reason"] == "ReadOnly" and "ENOSPC" in healthy["message"], healthy
        assert complete(server, first) == answer  # loads keep working: still served, still the same answer
