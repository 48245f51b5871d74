"""Drive vLLM 0.32's real v1 Scheduler and UCMConnector (scheduler + worker roles) without a GPU.

vLLM's model runner cannot run here (`vllm._C` does not load on CPU), so `Engine.step` plays its
part with the real classes: it binds the connector metadata the real scheduler produced, calls the
worker connector's hooks in the order vLLM's model runner does (start_load_kv, per layer
wait_for_layer_load / save_kv_layer, wait_for_save, get_finished, get_block_ids_with_load_errors),
and "computes" each scheduled token's KV as a deterministic function of (layer, head, position,
token) written into the real paged cache tensors at the slots vLLM allocated. The model is the only
stand-in; everything between scheduler and store is real.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from ucm.connector import UCMConnector

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
}
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(TINY_LLAMA["num_hidden_layers"])]
KV_HEADS = TINY_LLAMA["num_key_value_heads"]
HEAD = TINY_LLAMA["head_dim"]
EOS = 255
_none_hash_ready = False


def write_model_dir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return path


def make_vllm_config(
    model_dir: pathlib.Path,
    store: pathlib.Path,
    *,
    role: str = "kv_both",
    block_size: int = 16,
    max_batched_tokens: int = 256,
    extra: dict[str, Any] | None = None,
) -> VllmConfig:
    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=1024)
    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=max_batched_tokens, max_model_len=1024,
        enable_chunked_prefill=True, is_encoder_decoder=False,
    )
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=True)
    cache.kv_cache_layout = "LBHNC"
    ktc = KVTransferConfig(
        kv_connector="UCMConnector", kv_connector_module_path="ucm.connector", kv_role=role,
        kv_connector_extra_config={"store_path": str(store), "model_id": "test/tiny-llama", **(extra or {})},
    )
    return VllmConfig(
        model_config=model, scheduler_config=sched, cache_config=cache, kv_transfer_config=ktc,
        device_config=DeviceConfig("cpu"),
    )


def kv_cache_config(block_size: int, num_blocks: int) -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=torch.float32)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)])


def allocate_caches(num_blocks: int, block_size: int) -> dict[str, torch.Tensor]:
    """vLLM 0.32-style per-layer [B, H, N, 2D] views over one LBHNC allocation."""
    raw = torch.zeros(len(LAYERS), num_blocks, KV_HEADS, block_size, 2 * HEAD)
    return {name: raw[i] for i, name in enumerate(LAYERS)}


def fake_kv(layer: int, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in KV [tokens, heads, 2D] for (layer, head, position, token)."""
    h = torch.arange(KV_HEADS, dtype=torch.float32)[None, :, None]
    c = torch.arange(2 * HEAD, dtype=torch.float32)[None, None, :]
    p = positions.float()[:, None, None]
    t = tokens.float()[:, None, None]
    return torch.sin(0.37 * t + 0.011 * p * (c + 1) + 1.3 * h + 0.7 * layer)


class Engine:
    """One scheduler process and one worker (TP 1) sharing a store directory."""

    def __init__(
        self,
        model_dir: pathlib.Path,
        store: pathlib.Path,
        *,
        role: str = "kv_both",
        block_size: int = 16,
        num_blocks: int = 64,
        max_batched_tokens: int = 256,
        extra: dict[str, Any] | None = None,
        runner: Any = None,
        attention: Any = None,
    ) -> None:
        global _none_hash_ready
        if not _none_hash_ready:
            init_none_hash(sha256)
            _none_hash_ready = True
        self.block_size = block_size
        self.config = make_vllm_config(
            model_dir, store, role=role, block_size=block_size, max_batched_tokens=max_batched_tokens, extra=extra
        )
        self.config.cache_config.num_gpu_blocks = num_blocks
        kvc = kv_cache_config(block_size, num_blocks)
        self.scheduler = Scheduler(
            vllm_config=self.config, kv_cache_config=kvc,
            structured_output_manager=StructuredOutputManager(self.config), block_size=block_size, log_stats=True,
        )
        self.worker = UCMConnector(self.config, KVConnectorRole.WORKER, kvc)
        self.caches = allocate_caches(num_blocks, block_size)
        self.worker.register_kv_caches(self.caches)
        self.requests: dict[str, Request] = {}
        self.outputs: dict[str, list[int]] = {}
        self.kv_params: dict[str, dict[str, Any] | None] = {}
        self.metas: list[Any] = []
        self.stats: list[dict[str, Any]] = []
        self.runner = runner  # (engine, scheduler_output) -> {req_id: (per-layer KV, logits)}
        self.attention = attention  # (engine, scheduler_output, layer index, layer name) after its KV is written
        self.logits: dict[str, list[torch.Tensor]] = {}

    def add(self, req_id: str, prompt: Sequence[int], max_tokens: int = 2,
            kv_transfer_params: dict[str, Any] | None = None) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        params.update_from_generation_config({}, EOS)
        request = Request(
            request_id=req_id, prompt_token_ids=list(prompt), sampling_params=params, pooling_params=None,
            block_hasher=get_request_block_hasher(self.block_size, sha256),
        )
        request.kv_transfer_params = kv_transfer_params
        self.requests[req_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self, *, corrupt: Any = None) -> Any:
        so = self.scheduler.schedule()
        meta = so.kv_connector_metadata
        self.metas.append(meta)
        w = self.worker
        w.bind_connector_metadata(meta)
        if corrupt is not None:
            corrupt(meta)
        w.start_load_kv(None)  # type: ignore[arg-type]
        model_out: dict[str, Any] = {}
        forward = so.total_num_scheduled_tokens > 0  # else vLLM's kv_connector_no_forward: no layers run
        if self.runner is not None and forward:
            # A real model needs every earlier layer's KV before it runs, so wait for all layers,
            # run the forward, then write and save layer by layer.
            for name in LAYERS:
                w.wait_for_layer_load(name)
            model_out = self.runner(self, so)
        for li, name in enumerate(LAYERS if forward else []):
            if self.runner is None:
                w.wait_for_layer_load(name)
                self._compute_layer(so, li, name)
                if self.attention is not None:
                    self.attention(self, so, li, name)
            else:
                self._write_layer(so, li, name, {r: kv[li] for r, (kv, _) in model_out.items()})
            w.save_kv_layer(name, self.caches[name], None)  # type: ignore[arg-type]
        w.wait_for_save()
        sending, recving = w.get_finished(so.finished_req_ids)
        invalid = w.get_block_ids_with_load_errors()
        stats = w.get_kv_connector_stats()
        w.clear_connector_metadata()
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.requests[rid]
            done_prefill = req.num_computed_tokens >= req.num_tokens
            if rid in model_out:
                logits = model_out[rid][1]
                self.logits.setdefault(rid, []).append(logits[-1])
                sampled.append([int(logits[-1].argmax())] if done_prefill else [])
            else:
                sampled.append([7 + len(self.outputs.setdefault(rid, []))] if done_prefill else [])
        output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(
                finished_sending=sending, finished_recving=recving, invalid_block_ids=invalid,
                kv_connector_stats=stats,
            ),
        )
        engine_outputs = self.scheduler.update_from_output(so, output)
        for eo in engine_outputs.values():
            for out in eo.outputs:
                self.outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    self.kv_params[out.request_id] = out.kv_transfer_params
            if eo.scheduler_stats is not None and eo.scheduler_stats.kv_connector_stats:
                self.stats.append(dict(eo.scheduler_stats.kv_connector_stats))
        return so

    def _compute_layer(self, so: Any, layer: int, name: str) -> None:
        """Write the stand-in KV of every token scheduled this step into its vLLM-allocated slot."""
        kv = {}
        for rid, n in so.num_scheduled_tokens.items():
            req = self.requests[rid]
            start = req.num_computed_tokens - n
            tokens = torch.tensor(list(req.all_token_ids[start : start + n]))
            kv[rid] = fake_kv(layer, torch.arange(start, start + n), tokens)
        self._write_layer(so, layer, name, kv)

    def _write_layer(self, so: Any, layer: int, name: str, kv: dict[str, torch.Tensor]) -> None:
        """Write each request's new tokens' KV [n, H, 2D] into the slots vLLM allocated for them."""
        cache = self.caches[name]  # [B, H, N, 2D]
        for rid, n in so.num_scheduled_tokens.items():
            start = self.requests[rid].num_computed_tokens - n
            pos = torch.arange(start, start + n)
            block_ids = torch.tensor(self.scheduler.kv_cache_manager.get_block_ids(rid)[0])
            cache[block_ids[pos // self.block_size], :, pos % self.block_size, :] = kv[rid]

    def run_until_idle(self, max_steps: int = 50) -> None:
        """Step until every request finished and vLLM freed its blocks (finished requests whose
        blocks are being saved stay in `scheduler.requests` until the worker reports them)."""
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                if not self.scheduler.requests:
                    return
                self.flush()  # only finish saves are left: let the store complete them
            self.step()
        raise AssertionError("requests did not finish")

    def block_kv(self, req_id: str, upto_tokens: int) -> list[torch.Tensor]:
        """Per-layer [tokens, H, 2D] KV of a request's first tokens, read from the paged cache."""
        block_ids = torch.tensor(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])
        pos = torch.arange(upto_tokens)
        return [self.caches[n][block_ids[pos // self.block_size], :, pos % self.block_size, :] for n in LAYERS]

    def flush(self) -> None:
        self.worker.worker_side.flush()
