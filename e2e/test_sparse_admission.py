"""Admission beyond the KV pool with sparse offload, in the real engine (`vllm serve`, CPU build).

A pool of 14 blocks (128 tokens each, `--num-gpu-blocks-override`) holds 1,792 tokens. A dense
server with `--max-model-len 4096` on it refuses to start (vLLM's own check); the same server with
sparse offload starts (UCM's check counts what a request holds under offload), admits a
3,000-token prompt (24 blocks) that vLLM's full-prompt gate would keep waiting forever, prefills it
in 256-token chunks whose earlier blocks leave for the store, and answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from ucm.bench.sparse_admission import HELD
from ucm.serve.models import prepare
from ucm.serve.server import VllmServer, ucm_transfer_config

pytestmark = [pytest.mark.serving, pytest.mark.timeout(600)]
POOL = 14
PROMPT = 3000
ARGS = ["--num-gpu-blocks-override", str(POOL), "--max-num-batched-tokens", "256", "--enable-chunked-prefill"]
SPARSE = {"name": "block_retrieval", "keep_ratio": 0.25, "init_blocks": 1, "local_blocks": 2, "min_blocks": 4,
          "offload": True}


def server(work: Path, name: str, sparse: dict[str, Any] | None) -> VllmServer:
    extra = {"ucm_sparse_config": sparse} if sparse is not None else {}
    return VllmServer(model=prepare("tiny-llama"), log_dir=work, name=name, max_model_len=4096, extra_args=ARGS,
                      kv_transfer_config=ucm_transfer_config("kv_both", work / f"store-{name}", "tiny-llama", **extra))


def test_a_prompt_larger_than_the_pool_is_served_only_with_offload(tmp_path: Path) -> None:
    dense = server(tmp_path, "dense", None).start()
    sparse = server(tmp_path, "sparse", SPARSE).start()
    try:
        assert dense.wait_exit(300) != 0
        assert "max seq len (4096)" in dense.log_path.read_text(errors="replace")
        sparse.wait_ready()
        prompt = [(i * 7919) % 30000 + 100 for i in range(PROMPT)]
        reply = httpx.post(sparse.url + "/v1/completions", timeout=300, json={
            "model": "model", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        reply.raise_for_status()
        assert len(reply.json()["choices"][0]["token_ids"]) == 16
        log = sparse.log_path.read_text(errors="replace")
        assert "needs" in log and "bytes of KV cache under offload" in log  # UCM's start-up check ran
        ended = [m for m in HELD.finditer(log) if int(m[4]) >= PROMPT // 128]
        assert ended, "the 3,000-token request never offloaded"
        for m in ended:
            peak, context = int(m[3]), int(m[4])
            assert peak < POOL < context  # it never held more than the pool, whose size it exceeds
        metrics = sparse.metrics()
        assert metrics.get("vllm:ucm_sparse_offloaded_blocks_total", 0.0) >= PROMPT // 128 - 6
        assert metrics.get("vllm:ucm_sparse_lost_blocks_total", 0.0) == 0
    finally:
        dense.stop()
        sparse.stop()
