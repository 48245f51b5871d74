"""Cache blend's math and planning: re-rotation against the model's own RoPE, selection by deviation,
subset attention against dense causal attention, chunk splitting and the config's errors."""

from __future__ import annotations

import pytest
import torch

from ucm.blend.attention import subset_attention
from ucm.blend.chunks import chunk_spans, plan_request, separator_ends
from ucm.blend.config import BlendConfig, BlendConfigError
from ucm.blend.select import deviation, recompute_count, rerotate, select_recompute, stored_kv
from ucm.connector.config import ConfigError, parse_extra_config
from ucm.transfer.paged import KVLayout, request_kv
from ucm.window.rope import RopeSpec

ROPE = RopeSpec(theta=10000.0, head_dim=64)
SEP = [7, 8]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rerotation_is_exact_and_invertible() -> None:
    k = randn(300, 3, 64)
    pos = torch.arange(300)
    stored = ROPE.rotate(k, pos)  # the chunk computed alone, at 0..299
    moved = rerotate(stored, pos, pos + 1234, ROPE)
    assert torch.allclose(rerotate(moved, pos + 1234, pos, ROPE), stored, atol=1e-5)  # and back


def test_a_chunk_computed_at_p_is_the_stored_chunk_rotated_by_p() -> None:
    """Before the first layer's attention K depends on the token and its position only: K of the
    chunk computed at p + j (by Hugging Face's Llama rotary embedding, the model's own) equals the
    stored K (rotated at j) re-rotated by p."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=192, num_attention_heads=3, head_dim=64, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(cfg)
    k = randn(200, 3, 64, seed=1)

    def model_rotation(positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(k, positions[None])
        _, rotated = apply_rotary_pos_emb(k.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        return rotated[0].transpose(0, 1)

    j, p = torch.arange(200), 777
    assert torch.allclose(rerotate(model_rotation(j), j, j + p, ROPE), model_rotation(j + p), atol=1e-4)
    assert RopeSpec.from_hf_config(cfg) == ROPE


def test_selection_takes_the_largest_deviations_per_request() -> None:
    dev = torch.tensor([0.1, 5.0, 0.3, 2.0, 9.0, 0.0, 1.0, 1.0])
    chosen = select_recompute(dev, [4, 4], [0.5, 0.25])
    assert chosen.tolist() == [False, True, False, True, True, False, False, False]
    assert not select_recompute(dev, [8], [0.0]).any()
    assert select_recompute(dev, [8], [1.0]).all()
    assert select_recompute(torch.ones(4), [4], [0.5]).tolist() == [True, True, False, False]  # ties: earlier
    with pytest.raises(ValueError, match="sum to 4"):
        select_recompute(dev, [4], [0.5])


def test_deviation_is_the_squared_distance_of_k() -> None:
    fresh, loaded = randn(5, 3, 64), randn(5, 3, 64, seed=2)
    assert torch.allclose(deviation(fresh, loaded), ((fresh - loaded) ** 2).sum(dim=(1, 2)))
    assert recompute_count(100, 0.15) == 15 and recompute_count(7, 0.01) == 1 and recompute_count(7, 0.0) == 0


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    n = q.shape[0]
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)


class Metadata:
    def __init__(self, lens: list[int], tables: torch.Tensor) -> None:
        self.query_start_loc = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        self.seq_lens = torch.tensor(lens)
        self.block_table = tables


def test_subset_attention_rows_equal_dense_causal_attention() -> None:
    """Two requests in one step; any subset of their queries gets exactly the rows dense causal
    attention gives those queries, at their original positions (BHNC cache, GQA)."""
    bs, heads, kv_heads, d = 16, 4, 2, 64
    lens = [40, 23]
    tables = torch.tensor([[3, 0, 5], [1, 4, 2]])
    cache = torch.zeros(6, kv_heads, bs, 2, d)
    qs, expected = [], []
    for r, n in enumerate(lens):
        q, k, v = randn(n, heads, d, seed=10 + r), randn(n, kv_heads, d, seed=20 + r), randn(n, kv_heads, d, seed=30 + r)
        for t in range(n):
            cache[tables[r, t // bs], :, t % bs, 0], cache[tables[r, t // bs], :, t % bs, 1] = k[t], v[t]
        qs.append(q)
        expected.append(dense_reference(q, k, v, 0.125))
    query, want = torch.cat(qs), torch.cat(expected)
    selected = torch.tensor([0, 5, 17, 39, 40, 41, 62])
    out = torch.zeros(len(selected), heads * d)
    subset_attention(query[selected], selected, cache.view(6, kv_heads, bs, 2 * d), KVLayout.BHNC,
                     Metadata(lens, tables), 0.125, out)
    assert torch.allclose(out.view(-1, heads, d), want[selected], atol=1e-5)


def test_stored_blocks_decode_per_token_like_the_cache() -> None:
    blocks = randn(3, 2, 16, 128)  # three whole blocks of one layer, as read from the store
    k, v = stored_kv(blocks, KVLayout.BHNC, 64)
    want_k, want_v = request_kv(blocks, KVLayout.BHNC, torch.arange(3), 48, 64)
    assert torch.equal(k, want_k) and torch.equal(v, want_v) and k.shape == (48, 2, 64)


def test_prompt_splits_into_prefix_chunks_and_suffix() -> None:
    tokens = [1, 2, *SEP, 3, 7, 4, *SEP, 5, 6, *SEP, 9, 9]
    assert separator_ends(tokens, SEP) == [4, 9, 13]
    assert chunk_spans(tokens, SEP) == [(4, 9), (9, 13)]  # the prefix [0, 4) and the suffix are not chunks
    assert chunk_spans(tokens, SEP, first_token=5) == [(9, 13)]  # a chunk a prefix hit covers is not blended
    assert chunk_spans(tokens[:13], SEP) == [(4, 9)]  # the last token is always computed
    assert chunk_spans([1, 2, 3], SEP) == []


def test_plan_keeps_only_stored_chunks() -> None:
    tokens = [1, *SEP, 3, 3, *SEP, 4, 4, *SEP, 9]
    plan = plan_request("r", tokens, [5, 6], 0, SEP, 0.2, lambda spans: [[b"a" * 16], []][: len(spans)])
    assert plan is not None and [(c.start, c.block_hashes) for c in plan.chunks] == [(3, (b"a" * 16,))]
    assert plan.recompute_ratio == 0.2 and plan.block_ids == (5, 6)
    assert plan_request("r", tokens, [5], 0, SEP, 0.2, lambda spans: [[] for _ in spans]) is None


@pytest.mark.parametrize(("raw", "key"), [
    ({}, "separator_ids"), ({"separator_ids": []}, "separator_ids"), ({"separator_ids": ["#"]}, "separator_ids"),
    ({"separator_ids": [1], "recompute_ratio": 1.5}, "recompute_ratio"),
    ({"separator_ids": [1], "recompute_ratio": True}, "recompute_ratio"),
    ({"separator_ids": [1], "check_layer": -1}, "check_layer"), ({"separator_ids": [1], "ratio": 0.1}, "ratio"),
])
def test_bad_blend_config_names_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(BlendConfigError, match=rf"ucm_blend_config\.{key}"):
        BlendConfig.parse(raw)
    with pytest.raises(ConfigError, match=rf"kv_connector_extra_config\.ucm_blend_config\.{key}"):
        parse_extra_config({"store_path": "/s", "ucm_blend_config": raw}, default_model_id="m")


def test_blend_is_refused_beside_another_attention_algorithm() -> None:
    with pytest.raises(ConfigError, match="ucm_window_config and ucm_blend_config"):
        parse_extra_config({"store_path": "/s", "ucm_window_config": {"window": 8},
                            "ucm_blend_config": {"separator_ids": [1]}}, default_model_id="m")
    assert BlendConfig.parse({"separator_ids": 5}).separator_ids == (5,)
