"""Sparse attention with offload in the real engine: `vllm serve` (CPU build) with `ucm_sparse_config`.

What only a real engine shows: vLLM's CPU attention kernel reading compacted block tables (with a
work partition recomputed for them), the scheduler freeing a decoding request's stored blocks into
vLLM's own block pool, and the worker placing them back from the store into slots, all inside the
forward passes of a served request. The tiny fixed-seed Llama's answers are noise, but float32
greedy noise is deterministic, so "equal" below means bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ucm.bench.sparse_admission import HELD
from ucm.serve.models import prepare
from ucm.serve.server import VllmServer, start_all, ucm_transfer_config
from ucm.sparse.block_retrieval import BlockRetrievalConfig
from ucm.sparse.vllm_offload import num_slots

pytestmark = [pytest.mark.serving, pytest.mark.timeout(900)]
PROMPT = 2000  # tokens: 16 blocks of the CPU backend's 128
DECODE = 48
SPARSE = {"name": "block_retrieval", "init_blocks": 1, "local_blocks": 2, "min_blocks": 4, "offload": True}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VllmServer]]:
    model = prepare("tiny-llama")
    work = tmp_path_factory.mktemp("sparse")

    def server(name: str, sparse: dict[str, Any] | None) -> VllmServer:
        extra = {"ucm_sparse_config": sparse} if sparse is not None else {}
        return VllmServer(model=model, log_dir=work, name=name, kv_transfer_config=ucm_transfer_config(
            "kv_both", work / f"store-{name}", "tiny-llama", **extra))

    started = {
        "dense": server("dense", None),
        # every block selected, yet every block outside the windows leaves the pool and comes back
        "offload-all": server("offload-all", {**SPARSE, "keep_ratio": 1.0}),
        "quarter": server("quarter", {**SPARSE, "keep_ratio": 0.25}),
    }
    start_all(list(started.values()))
    try:
        yield started
    finally:
        for s in started.values():
            s.stop()


def prompt(seed: int) -> list[int]:
    return [(i * 7919 + seed * 104729) % 30000 + 100 for i in range(PROMPT)]


def decode(server: VllmServer, ids: list[int]) -> tuple[list[int], list[dict[str, float]]]:
    """Greedy token ids and each step's top-5 log-probabilities."""
    reply = httpx.post(server.url + "/v1/completions", timeout=600, json={
        "model": "model", "prompt": ids, "max_tokens": DECODE, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "logprobs": 5})
    reply.raise_for_status()
    choice = reply.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["top_logprobs"]


def counter(server: VllmServer, name: str) -> float:
    return server.metrics().get(f"vllm:ucm_sparse_{name}_total", 0.0)


def test_offload_with_every_block_selected_equals_dense_exactly(servers: dict[str, VllmServer]) -> None:
    ids = prompt(1)
    offloaded = counter(servers["offload-all"], "offloaded_blocks")
    assert decode(servers["offload-all"], ids) == decode(servers["dense"], ids)
    # 13 of the 16 prompt blocks (all but one initial and two local) left the pool and were placed back
    assert counter(servers["offload-all"], "offloaded_blocks") - offloaded >= PROMPT // 128 - 3
    assert counter(servers["offload-all"], "slot_loads") > 0
    assert counter(servers["offload-all"], "lost_blocks") == 0


def test_a_quarter_of_the_blocks_attended_while_the_rest_live_in_the_store(servers: dict[str, VllmServer]) -> None:
    ids = prompt(2)
    offloaded = counter(servers["quarter"], "offloaded_blocks")
    tokens, top = decode(servers["quarter"], ids)
    _, dense_top = decode(servers["dense"], ids)
    assert len(tokens) == DECODE
    assert counter(servers["quarter"], "offloaded_blocks") - offloaded >= PROMPT // 128 - 3
    # sparse attention really ran: the distributions moved (a random model's greedy token may not)
    moved = max(abs(a[t] - b.get(t, a[t])) for a, b in zip(top, dense_top, strict=True) for t in a)
    assert moved > 1e-4, "keep_ratio 0.25 decoded exactly as dense attention"
    assert counter(servers["quarter"], "lost_blocks") == 0 and counter(servers["quarter"], "slot_shortfall") == 0
    # at its last step the request held its windows, its slots and the block it was filling
    config = BlockRetrievalConfig.from_dict({**{k: v for k, v in SPARSE.items() if k != "name"}, "keep_ratio": 0.25})
    ended = [m for m in HELD.finditer(servers["quarter"].log_path.read_text()) if int(m[4]) >= PROMPT // 128]
    assert ended, "the scheduler logged no request whose offload ended"
    for m in ended:
        last, peak, context = int(m[2]), int(m[3]), int(m[4])
        assert last <= config.init_blocks + config.local_blocks + num_slots(config, context) + 1 < context
        assert last <= peak <= context
