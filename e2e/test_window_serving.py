"""ReRoPE in the real engine: `vllm serve` (CPU build) with `ucm_window_config`, compared with a plain
server and with a Hugging Face reference running the same formula (`e2e/hf_rerope.py`).

The tiny fixed-seed Llama is random, so its answers are noise, but float32 greedy noise is
deterministic: inside the window ReRoPE must change nothing at all (the backend's own kernel runs),
and beyond it the engine's prompt log-probabilities and greedy tokens (decode steps read the far
keys back from the paged cache) must match the reference that computes the formula directly on the
Hugging Face model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e import hf_rerope
from ucm.serve.models import prepare
from ucm.serve.server import VllmServer, start_all, ucm_transfer_config
from ucm.window.config import WindowConfig

pytestmark = [pytest.mark.serving, pytest.mark.timeout(900)]
WINDOW = 256
LONG = 700  # prompt tokens: well past the window
SHORT = 200


@pytest.fixture(scope="module")
def model() -> Path:
    return prepare("tiny-llama")


@pytest.fixture(scope="module")
def servers(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VllmServer]]:
    work = tmp_path_factory.mktemp("window")
    started = {
        "plain": VllmServer(model=model, log_dir=work, name="plain",
                            kv_transfer_config=ucm_transfer_config("kv_both", work / "store", "tiny-llama")),
        "rerope": VllmServer(model=model, log_dir=work, name="rerope", kv_transfer_config=ucm_transfer_config(
            "kv_both", work / "store", "tiny-llama", ucm_window_config={"window": WINDOW})),
    }
    start_all(list(started.values()))
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def prompt(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(" ".join(f"w{(i * 7919) % 100003}" for i in range(500)))["input_ids"]
    assert len(ids) >= LONG
    return list(ids[:LONG])


def generate(server: VllmServer, token_ids: list[int], max_tokens: int, logprobs: bool = True) -> dict[str, Any]:
    """Greedy token ids and (with `logprobs`: every prompt position computed, never loaded) the
    prompt's log-probabilities."""
    body: dict[str, Any] = {"model": "model", "prompt": token_ids, "max_tokens": max_tokens, "temperature": 0,
                            "return_token_ids": True, "ignore_eos": True}
    if logprobs:
        body["prompt_logprobs"] = 0
    reply = httpx.post(server.url + "/v1/completions", timeout=300, json=body)
    reply.raise_for_status()
    choice = reply.json()["choices"][0]
    entries = choice.get("prompt_logprobs") or [None]
    return {"prompt_logprobs": [next(iter(e.values()))["logprob"] for e in entries[1:]],
            "token_ids": choice["token_ids"]}


def test_inside_the_window_rerope_changes_nothing(servers: dict[str, VllmServer], prompt: list[int]) -> None:
    plain = generate(servers["plain"], prompt[:SHORT], 40)
    rerope = generate(servers["rerope"], prompt[:SHORT], 40)  # 240 tokens in all: never past the window
    assert rerope == plain


def test_beyond_the_window_the_engine_computes_the_formula(
    servers: dict[str, VllmServer], prompt: list[int], model: Path,
) -> None:
    served = generate(servers["rerope"], prompt, 16)
    plain = generate(servers["plain"], prompt, 16)
    reference = hf_rerope.load(model, WindowConfig(WINDOW))
    expected = hf_rerope.prompt_logprobs(reference, prompt)
    worst = max(abs(a - b) for a, b in zip(served["prompt_logprobs"], expected, strict=True))
    assert worst < 1e-4, f"prompt log-probabilities differ from the reference by up to {worst}"
    assert served["token_ids"] == hf_rerope.greedy(reference, prompt, 16)
    # and it is not plain attention: past the window the log-probabilities moved
    moved = max(abs(a - b) for a, b in zip(served["prompt_logprobs"], plain["prompt_logprobs"], strict=True))
    assert moved > 1e-3
    assert servers["rerope"].metrics().get("vllm:ucm_rerope_queries_total", 0.0) >= LONG - WINDOW


def metric(server: VllmServer, name: str) -> float:
    return server.metrics().get(f"vllm:ucm_{name}_total", 0.0)


def wait_saved(server: VllmServer, above: float) -> None:
    deadline = time.monotonic() + 30
    while metric(server, "saved_blocks") <= above and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server, "saved_blocks") > above, f"{server.name} saved nothing"


def test_rerope_and_plain_servers_never_share_blocks(servers: dict[str, VllmServer], prompt: list[int]) -> None:
    # both servers write to one store directory; their cache identities differ, so the rerope
    # server misses a prompt only the plain server has stored, then hits its own copy
    plain, rerope = servers["plain"], servers["rerope"]
    fresh = [t + 1 for t in prompt]
    saved = metric(plain, "saved_blocks")
    generate(plain, fresh, 1, logprobs=False)  # (prompt log-probabilities would bypass every cache)
    wait_saved(plain, saved)
    hits, saved = metric(rerope, "hit_tokens"), metric(rerope, "saved_blocks")
    first = generate(rerope, fresh, 8, logprobs=False)
    assert metric(rerope, "hit_tokens") == hits
    wait_saved(rerope, saved)
    assert generate(rerope, fresh, 8, logprobs=False) == first  # loaded ReRoPE KV gives the same answer
    deadline = time.monotonic() + 20
    while metric(rerope, "hit_tokens") == hits and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(rerope, "hit_tokens") > hits
