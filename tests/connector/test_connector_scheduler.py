"""The real vLLM 0.32 v1 Scheduler with UCMConnector: prefix hits, chunked prefill, preemption,
full-prompt hits, failed loads and the PD hand-off, with worker-side I/O against a real store."""

from __future__ import annotations

import os
import pathlib
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm")

import torch
from ucm_connector_harness import LAYERS, Engine, fake_kv, write_model_dir

from ucm.connector.scheduler import PARAM_IDENTITY, PARAM_TOKENS

BS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def expected_kv(prompt: list[int], upto: int) -> list[torch.Tensor]:
    pos = torch.arange(upto)
    return [fake_kv(li, pos, torch.tensor(prompt[:upto])) for li in range(len(LAYERS))]


def assert_kv(engine: Engine, req_id: str, prompt: list[int], upto: int) -> None:
    for got, want in zip(engine.block_kv(req_id, upto), expected_kv(prompt, upto), strict=True):
        assert torch.equal(got, want)


def produce(model_dir: pathlib.Path, store: pathlib.Path, prompt: list[int], **kw: object) -> Engine:
    engine = Engine(model_dir, store, **kw)  # type: ignore[arg-type]
    engine.add("first", prompt)
    engine.run_until_idle()
    engine.flush()
    return engine


def test_second_request_gets_external_hits_and_the_right_blocks(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    prompt = [(i * 7) % 250 + 1 for i in range(69)]  # 4 full blocks + 5 tokens
    first = produce(model_dir, tmp_path, prompt)
    saved = [s for m in first.metas for s in m.saves]
    assert [len(s.block_ids) for s in saved] == [4]
    assert first.metas[0].loads == []

    second = Engine(model_dir, tmp_path)  # another pod: empty GPU cache, same store
    shared = prompt[:60] + [3] * 10  # shares 3 full blocks (48 tokens) with the first prompt
    second.add("second", shared)
    so = second.step()
    (load,) = second.metas[-1].loads
    allocated = second.scheduler.kv_cache_manager.get_block_ids("second")[0]
    assert load.block_ids == allocated[:3]
    assert load.block_hashes == saved[0].block_hashes[:3]
    assert so.num_scheduled_tokens["second"] == len(shared) - 48
    assert_kv(second, "second", shared, len(shared))  # loaded part bit-exact, rest computed
    second.run_until_idle()
    assert len(second.outputs["second"]) == 2
    totals = {k: sum(s.get(k, 0) for s in second.stats) for k in ("hit_tokens", "loaded_blocks", "lookup_tokens")}
    assert totals["hit_tokens"] == 48 and totals["loaded_blocks"] == 3 and totals["lookup_tokens"] == 64


def test_full_prompt_hit_leaves_the_last_token_to_compute(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    prompt = [(i * 5) % 250 + 1 for i in range(64)]  # exactly 4 blocks
    produce(model_dir, tmp_path, prompt)
    engine = Engine(model_dir, tmp_path)
    engine.add("again", prompt)
    so = engine.step()
    (load,) = engine.metas[-1].loads
    assert len(load.block_ids) == 3  # never the whole prompt: the 4th block holds the last token
    assert so.num_scheduled_tokens["again"] == 16
    assert_kv(engine, "again", prompt, 64)
    engine.add("longer", prompt + [9] * 5)  # 69 tokens: all 4 full blocks hit (local now)
    engine.step()
    engine.run_until_idle()
    assert len(engine.outputs["longer"]) == 2


def test_chunked_prefill_saves_blocks_as_they_fill_and_a_consumer_loads_them(
    model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    prompt = [(i * 11) % 250 + 1 for i in range(100)]
    producer = Engine(model_dir, tmp_path, max_batched_tokens=40)
    producer.add("long", prompt)
    producer.run_until_idle()
    producer.flush()
    saves = [[len(s.block_ids) for s in m.saves] for m in producer.metas]
    # chunks of 40 tokens: blocks 0-1 full after chunk 1, 2-4 after chunk 2, 5 (of 6 full) after chunk 3
    assert saves[:3] == [[2], [3], [1]]
    assert sum(sum(x) for x in saves) == 6

    consumer = Engine(model_dir, tmp_path, role="kv_consumer", max_batched_tokens=40)
    consumer.add("long", prompt)
    so = consumer.step()
    assert so.num_scheduled_tokens["long"] == 4  # 96 tokens loaded, 4 computed
    assert [len(lo.block_ids) for lo in consumer.metas[-1].loads] == [6]
    assert_kv(consumer, "long", prompt, 100)
    consumer.run_until_idle()
    assert all(m.saves == [] for m in consumer.metas)  # a consumer never saves


def test_preempted_request_resumes_from_the_store(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # 9 usable blocks: two 64-token prompts fit (8 blocks), their 65th tokens do not.
    engine = Engine(model_dir, tmp_path, num_blocks=10)
    engine.scheduler.kv_cache_manager.enable_caching = False  # no local prefix cache: resume via UCM
    a = [(i * 3) % 250 + 1 for i in range(64)]
    b = [(i * 13) % 250 + 2 for i in range(64)]
    engine.add("a", a, max_tokens=4)
    engine.add("b", b, max_tokens=4)
    preempted = False
    for _ in range(30):
        if not engine.scheduler.has_unfinished_requests():
            break
        so = engine.step()
        preempted = preempted or bool(getattr(so, "preempted_req_ids", None))
        engine.flush()
    assert preempted, "the test must actually preempt a request"
    assert len(engine.outputs["a"]) == 4 and len(engine.outputs["b"]) == 4
    reloads = [lo for m in engine.metas[1:] for lo in m.loads]
    assert reloads, "the resumed request reloads its saved blocks"
    # resumed with 64 prompt + >= 1 generated tokens: all 4 saved prompt blocks come back
    assert [len(lo.block_ids) for lo in reloads] == [4] * len(reloads), [len(lo.block_ids) for lo in reloads]


def test_corrupted_block_turns_into_recompute(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    prompt = [(i * 17) % 250 + 1 for i in range(69)]
    first = produce(model_dir, tmp_path, prompt)
    victim = first.metas[0].saves[0].block_hashes[1]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and victim.hex() in p.name]
    assert files, "the saved block's objects must be in the store"
    for path in files:
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF  # flip payload bytes: the checksum no longer matches
        path.write_bytes(bytes(data))

    engine = Engine(model_dir, tmp_path)
    engine.add("r", prompt)
    engine.step()  # plans a 64-token hit; block 1 fails, vLLM rewinds to 16 tokens
    assert engine.requests["r"].num_computed_tokens == 16
    engine.step()  # recomputes tokens 16..68
    assert_kv(engine, "r", prompt, 69)  # recomputed blocks are right, not garbage
    engine.run_until_idle()
    engine.flush()
    assert len(engine.outputs["r"]) == 2
    healed = [p for p in tmp_path.rglob("*") if p.is_file() and victim.hex() in p.name and "quarantine" not in str(p)]
    assert healed, "the recomputed block is saved again"
    failures = sum(s.get("load_failures", 0) for s in engine.stats)
    assert failures == 1


def test_pd_handoff_through_kv_transfer_params(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    prompt = [(i * 19) % 250 + 1 for i in range(69)]
    consumer = Engine(model_dir, tmp_path, role="kv_consumer")
    producer = Engine(model_dir, tmp_path, role="kv_producer")
    identity = producer.worker.identity.digest().hex()

    # The router forwards the producer's params; the decode side must wait for the dump, not recompute.
    early = {"do_remote_prefill": True, PARAM_IDENTITY: identity, PARAM_TOKENS: 64}
    consumer.add("d", prompt, max_tokens=3, kv_transfer_params=early)
    so = consumer.step()
    assert "d" not in so.num_scheduled_tokens

    producer.add("p", prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    producer.run_until_idle()
    producer.flush()
    params = producer.kv_params["p"]
    assert params is not None
    assert params["do_remote_prefill"] is True and params[PARAM_TOKENS] == 64 and params[PARAM_IDENTITY] == identity
    assert all(m.loads == [] for m in producer.metas)  # nothing was stored before it

    # The next turn on another prefill pod loads the blocks stored before and saves only the new ones.
    other_prefill = Engine(model_dir, tmp_path, role="kv_producer")
    longer = prompt + [7] * 60
    other_prefill.add("p2", longer, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    other_prefill.run_until_idle()
    other_prefill.flush()
    assert [len(lo.block_ids) for m in other_prefill.metas for lo in m.loads] == [4]
    assert [len(sv.block_ids) for m in other_prefill.metas for sv in m.saves] == [4]
    params2 = other_prefill.kv_params["p2"]
    assert params2 is not None and params2[PARAM_TOKENS] == 128

    so = consumer.step()
    assert so.num_scheduled_tokens["d"] == 5
    assert [len(lo.block_ids) for lo in consumer.metas[-1].loads] == [4]
    assert_kv(consumer, "d", prompt, 69)
    consumer.run_until_idle()
    assert len(consumer.outputs["d"]) == 3
    assert all(m.saves == [] for m in consumer.metas)

    # Params from a producer with another cache identity are not trusted: no wait, plain lookup.
    other = Engine(model_dir, tmp_path, role="kv_consumer")
    other.add("x", [1] * 40, kv_transfer_params={**params, PARAM_IDENTITY: "00" * 16})
    so = other.step()
    assert so.num_scheduled_tokens["x"] == 40


def test_async_load_finishes_through_get_finished(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    prompt = [(i * 23) % 250 + 1 for i in range(69)]
    produce(model_dir, tmp_path, prompt)
    engine = Engine(model_dir, tmp_path, extra={"load_mode": "async"})
    engine.add("r", prompt)
    so = engine.step()
    assert "r" not in so.num_scheduled_tokens  # waiting for its KV, not computing
    (load,) = engine.metas[-1].loads
    assert load.is_async and len(load.block_ids) == 4
    deadline = time.monotonic() + 30  # the store reads on its own threads; steps go on meanwhile
    while time.monotonic() < deadline:
        so = engine.step()
        if "r" in so.num_scheduled_tokens:
            break
        time.sleep(0.01)
    assert so.num_scheduled_tokens["r"] == 5  # resumed after the load, with 64 tokens loaded
    assert_kv(engine, "r", prompt, 69)
    engine.run_until_idle()
    assert len(engine.outputs["r"]) == 2


def test_blocks_stored_for_another_max_tp_size_are_misses(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The tiny model's 2 KV heads: max_tp_size=1 stores one 2-head object per block, the default
    one object per head. A default consumer misses those blocks (and computes the prompt); a
    consumer with the same max_tp_size hits them."""
    prompt = [(i * 17) % 250 + 1 for i in range(50)]
    produce(model_dir, tmp_path, prompt, extra={"max_tp_size": 1})
    other = Engine(model_dir, tmp_path, role="kv_consumer")
    other.add("x", prompt)
    so = other.step()
    assert other.metas[-1].loads == [] and so.num_scheduled_tokens["x"] == 50
    same = Engine(model_dir, tmp_path, role="kv_consumer", extra={"max_tp_size": 1})
    same.add("x", prompt)
    so = same.step()
    assert [len(lo.block_ids) for lo in same.metas[-1].loads] == [3] and so.num_scheduled_tokens["x"] == 2
    assert_kv(same, "x", prompt, 50)


def free_blocks(engine: Engine) -> int:
    return engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def step_until_finished(engine: Engine, req_id: str, max_steps: int = 60) -> None:
    for _ in range(max_steps):
        engine.step()
        if req_id in engine.kv_params:
            return
    raise AssertionError(f"{req_id} did not finish")


def test_next_chat_turn_hits_the_previous_answer(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Turn 1 (40 prompt + 30 generated tokens) finishes: its blocks holding generated tokens are
    saved while vLLM keeps them allocated (delay_free_blocks), then freed. Turn 2, on another
    instance, sends prompt + answer + 10 new tokens and loads all 4 full blocks bit-exact."""
    first = Engine(model_dir, tmp_path)
    start = free_blocks(first)
    prompt = [(i * 29) % 250 + 1 for i in range(40)]  # 2 full blocks + 8 tokens
    first.add("turn1", prompt, max_tokens=30)
    step_until_finished(first, "turn1")
    answer = first.outputs["turn1"]
    assert len(answer) == 30
    assert [len(s.block_ids) for m in first.metas for s in m.saves] == [2]  # the prompt's, during prefill
    assert "turn1" in first.scheduler.requests and free_blocks(first) < start  # held for the finish save
    first.run_until_idle()
    (finish,) = [s for m in first.metas for s in m.finish_saves]
    assert len(finish.block_ids) == 2  # tokens 32..63; the 70th token (no KV yet) is in block 4
    assert not first.scheduler.requests and free_blocks(first) == start  # freed once reported: no leak
    saved = sum(s.get("saved_blocks", 0) for s in first.stats)
    assert saved == 4

    second = Engine(model_dir, tmp_path)
    turn2 = prompt + answer + [5] * 10  # 80 tokens
    second.add("turn2", turn2)
    so = second.step()
    (load,) = second.metas[-1].loads
    assert load.block_ids == second.scheduler.kv_cache_manager.get_block_ids("turn2")[0][:4]
    assert load.block_hashes[2:] == finish.block_hashes
    assert so.num_scheduled_tokens["turn2"] == 16
    assert_kv(second, "turn2", turn2, 80)  # the answer's KV came from the store, bit-exact
    second.run_until_idle()
    assert not second.scheduler.requests and free_blocks(second) == free_blocks(first)


def test_aborted_requests_free_every_block(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Abort paths: a decoding request saves its computed full blocks, then frees them; a waiting
    request, a consumer's request and one whose async load is in flight have nothing to save and
    are freed by vLLM as before."""
    from vllm.v1.request import RequestStatus

    engine = Engine(model_dir, tmp_path)
    start = free_blocks(engine)
    prompt = [(i * 31) % 250 + 1 for i in range(20)]
    engine.add("a", prompt, max_tokens=100)
    while len(engine.outputs.get("a", [])) < 30:  # 50 tokens, 49 with KV: blocks 0-2 full
        engine.step()
    engine.add("w", [1] * 20)  # never scheduled
    engine.scheduler.finish_requests(["a", "w"], RequestStatus.FINISHED_ABORTED)
    assert "a" in engine.scheduler.requests and "w" not in engine.scheduler.requests
    engine.run_until_idle()
    assert [len(s.block_ids) for m in engine.metas for s in m.finish_saves] == [2]  # blocks 1-2
    assert not engine.scheduler.requests and free_blocks(engine) == start

    consumer = Engine(model_dir, tmp_path, role="kv_consumer")
    consumer.add("c", prompt, max_tokens=40)
    consumer.run_until_idle()
    assert all(m.finish_saves == [] for m in consumer.metas)  # a consumer never saves
    assert free_blocks(consumer) == start

    # An async load in flight when the request is aborted: vLLM holds and frees the blocks itself.
    engine.flush()
    loader = Engine(model_dir, tmp_path, extra={"load_mode": "async"})
    loader.add("l", prompt + engine.outputs["a"] + [3] * 10)  # hits blocks 0-2
    loader.step()
    assert [len(lo.block_ids) for lo in loader.metas[-1].loads] == [3]
    loader.scheduler.finish_requests("l", RequestStatus.FINISHED_ABORTED)
    deadline = time.monotonic() + 30
    while loader.scheduler.requests and time.monotonic() < deadline:
        loader.step()
        time.sleep(0.01)
    assert all(m.finish_saves == [] for m in loader.metas)
    assert not loader.scheduler.requests and free_blocks(loader) == start


def test_preempted_request_aborted_while_waiting_frees_at_once(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A preempted request holds no blocks (vLLM passes none to request_finished): aborting it must
    not delay anything, and the survivor's finish frees every block."""
    from vllm.v1.request import RequestStatus

    engine = Engine(model_dir, tmp_path, num_blocks=10)
    engine.scheduler.kv_cache_manager.enable_caching = False
    start = free_blocks(engine)
    engine.add("a", [(i * 3) % 250 + 1 for i in range(64)], max_tokens=20)
    engine.add("b", [(i * 13) % 250 + 2 for i in range(64)], max_tokens=20)
    preempted: list[str] = []
    for _ in range(30):
        so = engine.step()
        preempted = sorted(getattr(so, "preempted_req_ids", None) or [])
        if preempted:
            break
    assert preempted, "the test must actually preempt a request"
    victim = preempted[0]
    assert engine.requests[victim].status == RequestStatus.PREEMPTED
    engine.scheduler.finish_requests(victim, RequestStatus.FINISHED_ABORTED)
    assert victim not in engine.scheduler.requests  # nothing held for it
    engine.run_until_idle()
    assert not engine.scheduler.requests and free_blocks(engine) == start
    survivor = ({"a", "b"} - {victim}).pop()
    assert len(engine.outputs[survivor]) == 20
    finish = [(s.req_id, len(s.block_ids)) for m in engine.metas for s in m.finish_saves]
    assert finish == [(survivor, 1)]  # 64 + 20 tokens: block 4 holds generated tokens only
