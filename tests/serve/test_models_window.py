"""`window-llama` is what we claim: a plain-RoPE Llama whose config says its (short) trained window.

Nothing here trains: the pure config builder is checked always, the prepared directory only when
`make models` (or `ucm model prepare window-llama`) has built it, and the cache-key logic of
`prepare` with a stand-in build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ucm.serve import models, train_window
from ucm.serve.train_window import TRAINED_WINDOW, WindowLlamaConfig, llama_config


def test_config_builder_is_a_plain_rope_llama_with_an_honest_window() -> None:
    config = llama_config(WindowLlamaConfig(), vocab_size=49152, bos_token_id=1, eos_token_id=2)
    d = config.to_dict()
    assert TRAINED_WINDOW == 256
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert d["max_position_embeddings"] == TRAINED_WINDOW
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}  # no scaling
    assert not d.get("rope_scaling")
    assert (d["num_hidden_layers"], d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"],
            d["head_dim"]) == (4, 256, 4, 2, 64)
    assert d["tie_word_embeddings"] and d["vocab_size"] == 49152


def test_config_refuses_heads_that_do_not_make_the_hidden_size() -> None:
    with pytest.raises(ValueError, match="heads"):
        WindowLlamaConfig(hidden_size=192)


def test_projected_embedding_keeps_the_top_directions_largest_first() -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(50, 6, generator=gen) * torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0, 0.1])
    full = train_window.projected_embedding(embedding, 6, 1.0)
    assert torch.allclose(full @ full.T, embedding @ embedding.T, atol=1e-3)  # a rotation: nothing lost
    top = train_window.projected_embedding(embedding, 3, 0.5)
    assert top.shape == (50, 3) and torch.allclose(top, full[:, :3] * 0.5, atol=1e-5)
    variance = (full**2).sum(0)
    assert bool((variance[:-1] >= variance[1:]).all())


def _fake_smollm2(cache: Path) -> Path:
    """A 'prepared' smollm2 directory holding only what the key reads: tokenizer files, embeddings."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    d = cache / "smollm2"
    d.mkdir(parents=True)
    for name in train_window.TOKENIZER_FILES:
        (d / name).write_text(f"{name} stand-in\n")
    save_file({"model.embed_tokens.weight": torch.zeros(4, 8)}, str(d / "model.safetensors"))
    (d / models.READY).write_text("smollm2\n")
    return d


def test_prepare_retrains_only_when_the_key_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smollm2(tmp_path)
    builds: list[Path] = []

    def fake_build(out: Path, smollm2_dir: Path) -> str:
        builds.append(smollm2_dir)
        (out / "config.json").write_text("{}")
        return "unused"

    monkeypatch.setattr(train_window, "build", fake_build)
    first = models.prepare("window-llama", cache=tmp_path)
    assert models.prepare("window-llama", cache=tmp_path) == first and len(builds) == 1
    assert builds[0] == (tmp_path / "smollm2").resolve()
    monkeypatch.setattr(train_window, "TRAIN_CODE_VERSION", train_window.TRAIN_CODE_VERSION + 1)
    models.prepare("window-llama", cache=tmp_path)
    assert len(builds) == 2
    (tmp_path / "smollm2" / "tokenizer.json").write_text("another tokenizer\n")
    models.prepare("window-llama", cache=tmp_path)
    assert len(builds) == 3


def test_prepared_model_matches_the_claim() -> None:
    out = models.default_cache() / "window-llama"
    if not (out / models.READY).exists():
        pytest.skip("window-llama is not prepared (make models)")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == TRAINED_WINDOW
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (4, 256, 4, 2, 64)
    assert all((out / name).is_file() for name in (*train_window.TOKENIZER_FILES, "model.safetensors"))
    facts = json.loads((out / "training.json").read_text())
    assert facts["trained_window"] == TRAINED_WINDOW
    inside = facts["held_out_loss_by_position"][str(TRAINED_WINDOW)]["all"]
    assert inside < facts["unigram_held_out_loss"] - 0.5, "it learned: well under the unigram baseline"
