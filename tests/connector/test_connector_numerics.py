"""Real numerics: a tiny randomly initialised HF Llama (fixed seed) computes a prompt's KV in one
process, which saves it through the connector as a PD producer; in this process a consumer loads it
into a fresh paged cache and decodes. The logits must match recomputing from scratch - also when a
stored block is corrupted (that block is recomputed instead of used)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")
pytest.importorskip("transformers")

import torch
from hf_glue import HFRunner, make_model, recompute_logits
from ucm_connector_harness import Engine, write_model_dir

HERE = pathlib.Path(__file__).parent
PROMPT = [(i * 37 + 11) % 250 + 1 for i in range(69)]  # 4 full blocks of 16 + 5 tokens
DECODE = 4

PRODUCER = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[1])
from hf_glue import HFRunner, make_model
from ucm_connector_harness import Engine
model_dir, store, prompt = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), json.loads(sys.argv[4])
engine = Engine(model_dir, store, role="kv_producer", runner=HFRunner(make_model()))
engine.add("p", prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
engine.run_until_idle()
engine.flush()
print("PARAMS=" + json.dumps(engine.kv_params["p"]))
"""


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("pd")
    model_dir, store = write_model_dir(root / "model"), root / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PRODUCER, str(HERE), str(model_dir), str(store), json.dumps(PROMPT)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("PARAMS=")][-1]
    return model_dir, store, json.loads(line.removeprefix("PARAMS="))


def decode_from_store(model_dir: pathlib.Path, store: pathlib.Path, params: dict[str, object]) -> Engine:
    engine = Engine(model_dir, store, role="kv_consumer", runner=HFRunner(make_model()))
    engine.add("d", PROMPT, max_tokens=DECODE, kv_transfer_params=params)
    engine.run_until_idle()
    return engine


def assert_same_as_recompute(engine: Engine) -> None:
    generated = engine.outputs["d"]
    assert len(generated) == DECODE
    reference = recompute_logits(make_model(), PROMPT + generated[:-1])
    got = torch.stack(engine.logits["d"][-DECODE:])
    want = reference[len(PROMPT) - 1 :]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert generated == [int(x) for x in want.argmax(-1)]  # greedy tokens identical too


def test_decode_from_loaded_kv_matches_recompute(produced: tuple[pathlib.Path, pathlib.Path, dict[str, object]]) -> None:
    model_dir, store, params = produced
    assert params["ucm_num_tokens"] == 64
    engine = decode_from_store(model_dir, store, params)
    (load,) = engine.metas[0].loads
    assert len(load.block_ids) == 4  # 64 of 69 prompt tokens came from the other process
    assert sum(s.get("loaded_blocks", 0) for s in engine.stats) == 4
    assert_same_as_recompute(engine)


def test_corrupted_block_is_recomputed_and_output_stays_correct(
    produced: tuple[pathlib.Path, pathlib.Path, dict[str, object]], tmp_path: pathlib.Path
) -> None:
    model_dir, store, params = produced
    probe = Engine(model_dir, store, role="kv_consumer")  # only to learn the block hashes
    probe.add("x", PROMPT)
    probe.step()
    victim = probe.metas[0].loads[0].block_hashes[2].hex()
    files = [p for p in store.rglob("*") if p.is_file() and victim in p.name]
    assert files
    for path in files:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))
    engine = decode_from_store(model_dir, store, params)
    assert sum(s.get("load_failures", 0) for s in engine.stats) == 1
    assert_same_as_recompute(engine)
