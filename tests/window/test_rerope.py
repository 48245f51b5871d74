"""ReRoPE's math, checked against the formula written out pair by pair and against vLLM's own parts:
the CPU backend's cache writer (the layout we read) and Hugging Face's rotary embedding."""

from __future__ import annotations

import pytest
import torch

from ucm.connector.config import ConfigError, parse_extra_config
from ucm.transfer.paged import KVLayout, request_kv
from ucm.window.config import WindowConfig, WindowConfigError
from ucm.window.rerope import reference_attention, rerope_attention
from ucm.window.rope import RopeSpec, RopeUnsupported

ROPE = RopeSpec(theta=10000.0, head_dim=64)
CONFIGS = [
    WindowConfig(64),
    WindowConfig(64, leak=8.0),
    WindowConfig(50, log_scale=True, trained_length=100),
    WindowConfig(17, leak=2.5, log_scale=True, trained_length=40),
]


def qkv(tokens: int, q_heads: int = 4, kv_heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tokens, h, 64, generator=g) for h in (q_heads, kv_heads, kv_heads))


def test_rerotation_composes_and_undoes_the_models_rotation() -> None:
    (x,) = qkv(300, 3, 3)[:1]
    pos = torch.arange(300)
    rotated = ROPE.rotate(x, pos)
    back = ROPE.rerotate(rotated, pos, torch.zeros_like(pos))
    assert torch.allclose(back, x, atol=1e-5)
    # rotating at p then moving to p' equals rotating at p' directly
    moved = ROPE.rerotate(rotated, pos, pos + 1000)
    assert torch.allclose(moved, ROPE.rotate(x, pos + 1000), atol=1e-4)


def test_rotation_is_the_models_own() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, rope_theta=10000.0)
    q, k, _ = qkv(40, 4, 4)
    pos = torch.arange(5000, 5040)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    hq, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.allclose(ROPE.rotate(q, pos[0]), hq[0].transpose(0, 1), atol=1e-5)
    assert RopeSpec.from_hf_config(cfg) == ROPE


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.identity())
def test_two_pass_attention_equals_the_formula(config: WindowConfig) -> None:
    q, k, v = qkv(300)
    pos = torch.arange(300)
    expected = reference_attention(q, k, v, pos, ROPE, config, 0.125)
    qr, kr = ROPE.rotate(q, pos), ROPE.rotate(k, pos)
    whole = rerope_attention(qr, kr, v, pos, ROPE, config, 0.125, chunk=37)
    tail = rerope_attention(qr[250:], kr, v, pos[250:], ROPE, config, 0.125)  # a later chunk / decode rows
    assert torch.allclose(whole, expected, atol=1e-5)
    assert torch.allclose(tail, expected[250:], atol=1e-5)


def test_beyond_the_window_it_differs_and_inside_it_is_plain_attention() -> None:
    q, k, v = qkv(200)
    pos = torch.arange(200)
    qr, kr = ROPE.rotate(q, pos), ROPE.rotate(k, pos)
    plain = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(0, 1), kr.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True, scale=0.125).transpose(0, 1)
    inside = rerope_attention(qr, kr, v, pos, ROPE, WindowConfig(200), 0.125)
    beyond = rerope_attention(qr, kr, v, pos, ROPE, WindowConfig(64), 0.125)
    assert torch.allclose(inside, plain, atol=1e-5)
    assert torch.allclose(beyond[:64], plain[:64], atol=1e-5)  # queries before the window see no far key
    assert (beyond[64:] - plain[64:]).abs().max() > 1e-3


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_cpu_cache_layout_is_what_vllms_cpu_writer_writes(isa: str) -> None:
    ops = pytest.importorskip("vllm._custom_ops")
    blocks, heads, bs, d = 4, 2, 128, 64
    kv_cache = torch.zeros(blocks, heads, bs, 2 * d)
    key_cache, value_cache = kv_cache.view(blocks, heads, 2 * bs, d).chunk(2, dim=2)
    _, k, v = qkv(300, 2, 2, seed=3)
    table = torch.tensor([2, 0, 3])  # a request's physical blocks, out of order
    slots = table.repeat_interleave(bs)[:300] * bs + torch.arange(300) % bs
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    got_k, got_v = request_kv(kv_cache, KVLayout.CPU_VEC, table, 300, d)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_bhnc_layout_reads_k_and_v_per_token() -> None:
    blocks, heads, bs, d = 3, 2, 16, 64
    _, k, v = qkv(40, 2, 2, seed=4)
    cache = torch.zeros(blocks, heads, bs, 2, d)
    table = torch.tensor([1, 2, 0])
    for t in range(40):
        cache[table[t // bs], :, t % bs, 0], cache[table[t // bs], :, t % bs, 1] = k[t], v[t]
    got_k, got_v = request_kv(cache.view(blocks, heads, bs, 2 * d), KVLayout.BHNC, table, 40, d)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


@pytest.mark.parametrize(("raw", "key"), [
    ({}, "window"), ({"window": 0}, "window"), ({"window": "512"}, "window"), ({"window": 8, "leak": 1}, "leak"),
    ({"window": 8, "leak": True}, "leak"), ({"window": 8, "log_scale": "yes"}, "log_scale"),
    ({"window": 8, "log_scale": True}, "trained_length"), ({"window": 8, "trained_length": 1}, "trained_length"),
    ({"window": 8, "windw": 3}, "windw"),
])
def test_bad_window_config_names_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(WindowConfigError, match=rf"ucm_window_config\.{key}\b"):
        WindowConfig.parse(raw)
    with pytest.raises(ConfigError, match=rf"kv_connector_extra_config\.ucm_window_config\.{key}\b"):
        parse_extra_config({"store_path": "/s", "ucm_window_config": raw}, default_model_id="m")


def test_window_and_sparse_are_refused_together() -> None:
    with pytest.raises(ConfigError, match="ucm_sparse_config and ucm_window_config"):
        parse_extra_config({"store_path": "/s", "ucm_window_config": {"window": 8},
                            "ucm_sparse_config": {"name": "block_retrieval"}}, default_model_id="m")


def test_identity_names_every_parameter() -> None:
    assert WindowConfig(512).identity() == "rerope:w=512"
    assert WindowConfig(512, leak=16.0, log_scale=True, trained_length=8192).identity() == "rerope:w=512,leak=16,log=8192"
    assert len({c.identity() for c in CONFIGS}) == len(CONFIGS)


def test_scaled_or_partial_rope_is_refused_naming_it() -> None:
    from transformers import LlamaConfig

    yarn = LlamaConfig(head_dim=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                      "original_max_position_embeddings": 2048})
    with pytest.raises(RopeUnsupported, match="rope_type='yarn'"):
        RopeSpec.from_hf_config(yarn)
    partial = LlamaConfig(head_dim=64)
    partial.partial_rotary_factor = 0.5
    with pytest.raises(RopeUnsupported, match="partial_rotary_factor"):
        RopeSpec.from_hf_config(partial)


def test_cache_identity_changes_with_rerope_and_rope_scaling_only() -> None:
    from transformers import LlamaConfig

    from ucm.connector.connector import attention_identity
    from ucm.hashing import CacheIdentity, KVGeometry

    plain_cfg = parse_extra_config({"store_path": "/s"}, default_model_id="m")
    rerope_cfg = parse_extra_config({"store_path": "/s", "ucm_window_config": {"window": 512}}, default_model_id="m")
    hf = LlamaConfig(head_dim=64)
    yarn = LlamaConfig(head_dim=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                      "original_max_position_embeddings": 2048})
    assert attention_identity(hf, plain_cfg) == ""
    assert attention_identity(hf, rerope_cfg) == "rerope:w=512"
    assert attention_identity(yarn, plain_cfg).startswith("rope:")

    def digest(attention: str) -> bytes:
        return CacheIdentity("m", "main", "float32", KVGeometry(2, 2, 64), 128, attention=attention).digest()

    assert b'"attention"' not in CacheIdentity("m", "main", "float32", KVGeometry(2, 2, 64), 128).canonical()
    assert len({digest(""), digest("rerope:w=512"), digest("rerope:w=256")}) == 3
