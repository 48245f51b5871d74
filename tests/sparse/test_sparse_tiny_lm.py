"""The tiny causal model the sparse bench is judged on: it learns, deterministically, is cached by
key, and the Q/K/V it exposes are exactly what its attention computes (so the decode replay in the
bench measures the model's real attention). Tiny configs only: CI never trains for minutes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ucm.bench.tiny_lm import TinyCausalLM, TinyLMConfig, cache_key, load_or_train, stdlib_corpus, train
from ucm.sparse import retrieval_math as rm

TINY = TinyLMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context=64, steps=40, batch=4, lr=1e-2, warmup=5)


@pytest.fixture(scope="module")
def corpus() -> bytes:
    return stdlib_corpus()[0][:300_000]


def test_training_lowers_bits_per_byte(corpus: bytes) -> None:
    log = train(TINY, corpus).log
    assert 7.5 < log["first_step_bits_per_byte"] < 8.5  # uniform over 256 bytes is 8 bits
    assert log["final_train_bits_per_byte"] < log["first_step_bits_per_byte"] - 2.5


def test_training_is_deterministic(corpus: bytes) -> None:
    config = TinyLMConfig(**{**TINY.__dict__, "steps": 8})
    a, b = train(config, corpus).model.state_dict(), train(config, corpus).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = train(TinyLMConfig(**{**TINY.__dict__, "steps": 8, "seed": 1}), corpus).model.state_dict()
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_cache_trains_once_and_keys_by_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCM_CACHE_DIR", str(tmp_path))
    config = TinyLMConfig(**{**TINY.__dict__, "steps": 3})
    first = load_or_train(config, progress_every=0)
    second = load_or_train(config, progress_every=0)
    assert first.log["cached"] is False and second.log["cached"] is True
    assert second.log["final_train_bits_per_byte"] == first.log["final_train_bits_per_byte"]
    sa, sb = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(list((tmp_path / "tiny_lm").glob("*.pt"))) == 1
    corpus = stdlib_corpus()[0]
    assert cache_key(config, corpus) != cache_key(TinyLMConfig(**{**config.__dict__, "steps": 4}), corpus)
    assert cache_key(config, corpus) != cache_key(config, corpus + b"x")


def test_captured_qkv_reproduce_the_models_causal_attention(corpus: bytes) -> None:
    """Decode attention over the captured (post-RoPE) K/V, grouped as the bench groups GQA heads,
    equals the attention output inside the model at every position; and K/V of a prefix do not
    depend on later tokens (what makes them a KV cache)."""
    model = train(TinyLMConfig(**{**TINY.__dict__, "steps": 5}), corpus).model
    ids = torch.tensor(list(corpus[1000:1064]))[None]
    inner: list[torch.Tensor] = []
    hook = model.blocks[1].wo.register_forward_pre_hook(lambda _m, args: inner.append(args[0][0].detach()))
    captured: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        model(ids, capture=captured)
    hook.remove()
    q, k, v = captured[1]
    assert q.shape == (64, 4, 8) and k.shape == v.shape == (64, 2, 8)
    kb, _ = rm.to_block_major(k, 16)
    vb, _ = rm.to_block_major(v, 16)
    for t in (0, 17, 40, 63):
        out = rm.dense_decode_attention(q[t], kb, vb, t + 1, 8**-0.5)
        torch.testing.assert_close(out.reshape(-1), inner[0][t], rtol=1e-4, atol=1e-5)
    prefix: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        model(ids[:, :30], capture=prefix)
    torch.testing.assert_close(prefix[1][1], k[:30], rtol=1e-5, atol=1e-6)


def test_bad_config_and_overlong_input_are_refused() -> None:
    with pytest.raises(ValueError, match="n_kv_heads"):
        TinyLMConfig(d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="exceed the trained context 64"):
        TinyCausalLM(TINY)(torch.zeros(1, 65, dtype=torch.long))


def test_bench_replays_the_models_decode_on_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's tiny_lm run end to end on a tiny model (GQA windows from held-out text): at keep
    1.0 both the per-head replay and the vLLM-path replay equal dense attention; at 25% they read
    fewer bytes and differ from dense."""
    import argparse

    from ucm.bench.sparse import bench_trained
    from ucm.bench.sparse_data import tiny_lm_qkv
    from ucm.bench.sparse_paged import bench_trained_paged

    monkeypatch.setenv("UCM_CACHE_DIR", str(tmp_path))
    config = TinyLMConfig(**{**TINY.__dict__, "context": 256, "steps": 10})
    windows, log = tiny_lm_qkv(num_windows=2, config=config)
    assert log["held_out_bits_per_byte"] < 8.0 and log["config"]["context"] == 256
    assert [lq.key.shape for lq in windows[0]] == [(256, 2, 8)] * 2 and windows[0][0].query.shape == (256, 4, 8)
    args = argparse.Namespace(stride=1, summary="mass")
    per_head = bench_trained(args, windows, 16, 8, ratios=(1.0, 0.25))
    paged = bench_trained_paged(args, windows, 16, 8, ratios=(1.0, 0.25))
    for result in (per_head, paged):
        assert result["keep_1.0"]["cosine_p1"] > 0.99999 and result["keep_1.0"]["max_abs_err"] < 1e-4
        assert result["keep_0.25"]["bytes_reduction"] > 2.5
        assert result["keep_0.25"]["cosine_mean"] < 0.99999
