"""Cache blend in the real engine: `vllm serve` (CPU build) with `ucm_blend_config`, a producer that
stores chunks and a consumer that blends them, on the tiny fixed-seed Llama.

The model is random, so its answers are noise, but float32 greedy noise is deterministic: at recompute
ratio 1 every token is recomputed from the check layer on, so the answer must be full recompute's
token for token; at ratio 0 the stored chunks' KV is used as loaded (the log-probabilities must move:
reuse happened); the counters say exactly how many tokens were reused and recomputed; a chunk the store
lacks is computed; and a blended prompt the producer saved back is a plain prefix hit afterwards.
The tiny model has two layers, so the check layer is 0 (blend needs a layer after it).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ucm.serve.models import prepare
from ucm.serve.server import VllmServer, start_all, ucm_transfer_config

pytestmark = [pytest.mark.serving, pytest.mark.timeout(900)]
SEP = [11, 12]
BLOCK = 128  # the CPU backend's KV block size


def tokens(n: int, seed: int) -> list[int]:
    return [100 + (i * 7919 + seed * 104729) % 30000 for i in range(n)]


PREFIX = tokens(30, 1) + SEP  # 32 tokens: no whole block, computed
CHUNK_A = tokens(2 * BLOCK - 2, 2) + SEP  # two whole blocks
CHUNK_B = tokens(BLOCK - 2, 3) + SEP  # one
CHUNK_C = tokens(BLOCK - 2, 4) + SEP  # never stored
QUESTION = tokens(20, 5)
PROMPT = PREFIX + CHUNK_A + CHUNK_B + QUESTION


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VllmServer]]:
    model = prepare("tiny-llama")
    work = tmp_path_factory.mktemp("blend")
    blend = {"ucm_blend_config": {"separator_ids": SEP, "check_layer": 0}}
    started = {
        role: VllmServer(model=model, log_dir=work, name=role, max_model_len=2048,
                         extra_args=["--max-num-batched-tokens", "2048"],
                         kv_transfer_config=ucm_transfer_config(f"kv_{role}", work / "store", "tiny-llama", **blend))
        for role in ("producer", "consumer")
    }
    start_all(list(started.values()))
    try:
        for chunk in (CHUNK_A, CHUNK_B):  # a chunk is stored by a request that begins with it
            complete(started["producer"], chunk, {})
        wait_metric(started["producer"], "saved_blocks", 3)
        yield started
    finally:
        for server in started.values():
            server.stop()


def complete(server: VllmServer, prompt: list[int], params: dict[str, Any], logprobs: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "model", "prompt": prompt, "max_tokens": 16, "temperature": 0,
                            "return_token_ids": True, "ignore_eos": True, **params}
    if logprobs:
        body["prompt_logprobs"] = 0
    reply = httpx.post(server.url + "/v1/completions", timeout=300, json=body)
    reply.raise_for_status()
    choice = reply.json()["choices"][0]
    entries = choice.get("prompt_logprobs") or [None]
    return {"token_ids": choice["token_ids"],
            "prompt_logprobs": [next(iter(e.values()))["logprob"] for e in entries[1:]]}


def metric(server: VllmServer, name: str) -> float:
    return server.metrics().get(f"vllm:ucm_{name}_total", 0.0)


def wait_metric(server: VllmServer, name: str, at_least: float) -> float:
    """The counter once it reaches `at_least` (workers report counters with the step's output), or
    whatever it is after 30 s."""
    deadline = time.monotonic() + 30
    while (value := metric(server, name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def ratio(value: float) -> dict[str, Any]:
    return {"kv_transfer_params": {"ucm_blend_ratio": value}}


def full() -> dict[str, Any]:
    return {"cache_salt": uuid.uuid4().hex}  # a fresh salt: no chunk or prefix can hit


def test_ratio_one_reproduces_full_recompute_token_for_token(servers: dict[str, VllmServer]) -> None:
    consumer = servers["consumer"]
    reused = metric(consumer, "blend_reused_tokens")
    recomputed = metric(consumer, "blend_recomputed_tokens")
    expected = complete(consumer, PROMPT, full())
    assert metric(consumer, "blend_reused_tokens") == reused  # salted: nothing was reused
    blended = complete(consumer, PROMPT, ratio(1.0))
    assert wait_metric(consumer, "blend_reused_tokens", reused + 3 * BLOCK) == reused + 3 * BLOCK
    assert wait_metric(consumer, "blend_recomputed_tokens", recomputed + 3 * BLOCK) == recomputed + 3 * BLOCK
    assert blended["token_ids"] == expected["token_ids"]


def test_reuse_moves_the_answer_and_the_ratio_sets_what_is_recomputed(servers: dict[str, VllmServer]) -> None:
    consumer = servers["consumer"]
    suffix = slice(len(PROMPT) - len(QUESTION) - 1, None)  # positions blend always computes
    exact = complete(consumer, PROMPT, full(), logprobs=True)["prompt_logprobs"][suffix]
    recomputed = metric(consumer, "blend_recomputed_tokens")
    naive = complete(consumer, PROMPT, ratio(0.0), logprobs=True)["prompt_logprobs"][suffix]
    half = complete(consumer, PROMPT, ratio(0.5), logprobs=True)["prompt_logprobs"][suffix]
    assert max(abs(a - b) for a, b in zip(naive, exact, strict=True)) > 1e-4  # the stored chunks were used
    assert all(math.isfinite(x) for x in naive + half)
    want = recomputed + math.ceil(0.5 * 3 * BLOCK)  # ratio 0 recomputes none of the 384 reused tokens
    assert wait_metric(consumer, "blend_recomputed_tokens", want) == want


def test_a_chunk_the_store_lacks_is_computed(servers: dict[str, VllmServer]) -> None:
    consumer = servers["consumer"]
    reused = metric(consumer, "blend_reused_tokens")
    complete(consumer, PREFIX + CHUNK_C + CHUNK_A + QUESTION, ratio(0.15))
    assert wait_metric(consumer, "blend_reused_tokens", reused + 2 * BLOCK) == reused + 2 * BLOCK


def test_a_blended_prompt_saved_back_is_a_prefix_hit(servers: dict[str, VllmServer]) -> None:
    producer, consumer = servers["producer"], servers["consumer"]
    prompt = PREFIX + CHUNK_B + CHUNK_A + QUESTION  # another order: blended on the producer, then saved
    saved = metric(producer, "saved_blocks")
    complete(producer, prompt, {})
    whole = (len(prompt) - 1) // BLOCK
    assert wait_metric(producer, "saved_blocks", saved + whole) == saved + whole
    hits = metric(consumer, "hit_tokens")
    complete(consumer, prompt, {"kv_transfer_params": {"ucm_blend": False}})
    assert wait_metric(consumer, "hit_tokens", hits + whole * BLOCK) == hits + whole * BLOCK
