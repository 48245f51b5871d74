"""The layer boundaries we promise, checked in a fresh interpreter per layer.

`ucm.store`, `ucm.transfer` and the GPU checks run on a GPU node that has only torch; the router
runs in a small image without torch or vLLM; the operator ships without vLLM, torch or the in-pod
library. An import that crosses a boundary works on a developer machine (everything is installed)
and fails in production, so only a test that looks at what importing a layer actually loads can
catch it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# layer -> (modules that make it up, top-level packages it must not load)
BOUNDARIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hashing": (("ucm.hashing",), ("torch", "vllm", "kubernetes", "kubernetes_asyncio", "aiohttp")),
    "store": (("ucm.store", "ucm.store.file_store", "ucm.store.cli"), ("vllm", "kubernetes", "kubernetes_asyncio")),
    "transfer": (("ucm.transfer", "ucm.transfer.paged", "ucm.transfer.staging"),
                 ("vllm", "kubernetes", "kubernetes_asyncio")),
    "router": (("ucm.router.server", "ucm.router.cli", "ucm.router.proxy", "ucm.router.kube"),
               ("torch", "vllm", "kubernetes")),
    "connector config": (("ucm.connector.config",), ("torch", "vllm", "kubernetes", "kubernetes_asyncio")),
    # the sparse registry is imported on the scheduler side and to validate configs: torch only in algorithms
    "sparse registry": (("ucm.sparse", "ucm.sparse.registry", "ucm.sparse.active"), ("torch", "vllm", "kubernetes")),
    # `make gpu-check` runs on a GPU machine with ucm and torch only
    "gpu checks": (("ucm.bench.gpu_transfer", "ucm.bench.gpu_sparse", "ucm.bench.gpu_window"),
                   ("vllm", "transformers", "aiohttp", "kubernetes", "kubernetes_asyncio")),
    # shared by every benchmark, the router's (no torch) included
    "bench common": (("ucm.bench", "ucm.bench.common"), ("torch", "vllm", "aiohttp", "kubernetes")),
    "router bench": (("ucm.bench.router", "ucm.bench.toy_proxy", "ucm.bench.fake_upstreams"),
                     ("torch", "vllm", "kubernetes")),
    "operator": (("ucm_operator.cli", "ucm_operator.runtime", "ucm_operator.bench", "ucm_operator.reconcile"),
                 ("vllm", "torch", "ucm")),
}

_PROBE = """
import importlib, json, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
forbidden = set(sys.argv[1].split(","))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in forbidden)))
"""


@pytest.mark.parametrize("layer", sorted(BOUNDARIES))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    modules, forbidden = BOUNDARIES[layer]
    out = subprocess.run([sys.executable, "-c", _PROBE, ",".join(forbidden), *modules],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"importing {layer} failed:\n{out.stderr[-3000:]}"
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not loaded, f"{layer} ({', '.join(modules)}) loads {loaded}; it must not load {', '.join(forbidden)}"
