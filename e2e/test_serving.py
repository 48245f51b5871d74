"""Real `vllm serve` processes (vLLM's CPU build) with UCMConnector, asserting on what a user sees.

Every server here is a real process on a loopback port, serving the tiny fixed-seed Llama in float32
(its answers are noise, but greedy noise is deterministic, so a load can be compared token for token
with a recompute). vLLM's own prefix cache is off, so a hit can only come from the UCM store; hits
and load failures are read from the server's /metrics. The servers are started per module and always
stopped.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ucm.serve.models import prepare
from ucm.serve.server import RouterProcess, VllmServer, start_all, ucm_transfer_config

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.serving, pytest.mark.timeout(900)]
MODEL_ID = "tiny-llama"
BLOCK = 128  # the CPU attention backend's KV block size


@pytest.fixture(scope="module")
def model() -> Path:
    return prepare("tiny-llama")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving")


def text_of(n_words: int, seed: int) -> str:
    """Distinct deterministic text: different seeds share no block."""
    return " ".join(f"w{seed}x{(i * 7919 + seed) % 100003}" for i in range(n_words))


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def complete(url: str, prompt: str, max_tokens: int = 12) -> str:
    out = client(url).completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text


def counter(server: VllmServer, name: str) -> float:
    return server.metrics().get(f"vllm:ucm_{name}_total", 0.0)


def wait_counter(server: VllmServer, name: str, above: float, timeout_s: float = 20.0) -> float:
    """vLLM publishes connector stats with the step's outputs; poll until the counter moves."""
    deadline = time.monotonic() + timeout_s
    value = counter(server, name)
    while value <= above and time.monotonic() < deadline:
        time.sleep(0.2)
        value = counter(server, name)
    return value


def ucm_server(model: Path, work: Path, name: str, store: Path, role: str = "kv_both", **kw: object) -> VllmServer:
    extra = kw.pop("extra", {})
    return VllmServer(
        model=model, log_dir=work / "logs", name=name,
        kv_transfer_config=ucm_transfer_config(role, store, MODEL_ID, **extra),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def pair(model: Path, work: Path) -> Iterator[dict[str, VllmServer]]:
    """`a`: float32 UCM server; `bf16`: the same model and store in bfloat16 (other KV bytes)."""
    store = work / "store"
    servers = {
        "a": ucm_server(model, work, "a", store),
        "bf16": ucm_server(model, work, "bf16", store, dtype="bfloat16"),
    }
    start_all(list(servers.values()))
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def test_repeated_prompt_loads_from_the_store_with_identical_output(pair: dict[str, VllmServer]) -> None:
    a = pair["a"]
    prompt = text_of(900, seed=1)
    first = complete(a.url, prompt)
    wait_counter(a, "saved_blocks", 0)
    hits_before = counter(a, "hit_tokens")
    second = complete(a.url, prompt)
    hits = wait_counter(a, "hit_tokens", hits_before) - hits_before
    assert second == first
    assert hits >= 4 * BLOCK, f"second request hit only {hits} tokens"
    assert counter(a, "load_failures") == 0


def test_second_turn_reuses_the_first_turns_prompt_and_answer(pair: dict[str, VllmServer]) -> None:
    a = pair["a"]
    chat = client(a.url).chat.completions
    turn1 = [{"role": "user", "content": text_of(600, seed=2)}]
    answer = chat.create(model="model", messages=turn1, max_tokens=200, temperature=0).choices[0].message.content
    assert answer
    turn1_tokens = len(a_tokens(a, turn1))
    wait_counter(a, "saved_blocks", 0)
    before = counter(a, "hit_tokens")
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    chat.create(model="model", messages=turn2, max_tokens=4, temperature=0)
    hits = wait_counter(a, "hit_tokens", before) - before
    # Blocks past turn 1's prompt exist only if the finished request's answer blocks were saved.
    assert hits > (turn1_tokens // BLOCK) * BLOCK, f"turn 2 hit {hits} tokens; turn 1's prompt had {turn1_tokens}"


def a_tokens(server: VllmServer, messages: list[dict[str, str]]) -> list[int]:
    import json
    import urllib.request

    body = json.dumps({"model": "model", "messages": messages, "add_generation_prompt": True}).encode()
    request = urllib.request.Request(server.url + "/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return list(json.load(response)["tokens"])


def test_a_server_with_other_kv_bytes_never_loads_them(pair: dict[str, VllmServer]) -> None:
    a, other = pair["a"], pair["bf16"]
    prompt = text_of(900, seed=3)
    complete(a.url, prompt)
    wait_counter(a, "saved_blocks", 0)
    lookups = counter(other, "lookup_tokens")
    complete(other.url, prompt)
    assert wait_counter(other, "lookup_tokens", lookups) > lookups
    assert counter(other, "hit_tokens") == 0
    assert counter(other, "loaded_blocks") == 0


def test_a_flipped_byte_in_a_stored_block_is_recomputed_to_the_same_answer(
    pair: dict[str, VllmServer], work: Path
) -> None:
    a = pair["a"]
    prompt = text_of(900, seed=4)
    first = complete(a.url, prompt)
    saved = wait_counter(a, "saved_blocks", 0)
    assert saved > 0
    for path in (work / "store" / "objects").rglob("*.kv"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x40
        path.write_bytes(bytes(data))
    failures = counter(a, "load_failures")
    again = complete(a.url, prompt)
    assert again == first
    assert wait_counter(a, "load_failures", failures) > failures


def test_a_restarted_server_reuses_the_stored_blocks(
    pair: dict[str, VllmServer], model: Path, work: Path, request: pytest.FixtureRequest
) -> None:
    a = pair["a"]
    prompt = text_of(900, seed=5)
    first = complete(a.url, prompt)
    wait_counter(a, "saved_blocks", 0)
    a.stop()
    with ucm_server(model, work, "a-restarted", work / "store") as restarted:
        assert complete(restarted.url, prompt) == first
        assert wait_counter(restarted, "hit_tokens", 0) >= 4 * BLOCK


# ---------------------------------------------------------------- PD: producer -> router -> consumer


@pytest.fixture(scope="module")
def pd(model: Path, work: Path) -> Iterator[dict[str, object]]:
    store = work / "pd-store"
    single = VllmServer(model=model, log_dir=work / "logs", name="single")  # no connector: the reference
    producer = ucm_server(model, work, "producer", store, role="kv_producer")
    consumer = ucm_server(model, work, "consumer", store, role="kv_consumer")
    start_all([single, producer, consumer])
    router = None
    try:
        router = RouterProcess([producer.url], [consumer.url], work / "logs").start()
        yield {"single": single, "producer": producer, "consumer": consumer, "router": router.url}
    finally:
        if router is not None:
            router.stop()
        for server in (single, producer, consumer):
            server.stop()


def _stream_text(chunks: Iterator[object], chat: bool) -> str:
    parts = []
    for chunk in chunks:
        choices = chunk.choices  # type: ignore[attr-defined]
        if choices:
            parts.append((choices[0].delta.content if chat else choices[0].text) or "")
    return "".join(parts)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streaming"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_pd_through_the_router_answers_as_a_single_server_does(
    pd: dict[str, object], api: str, stream: bool
) -> None:
    single, consumer = pd["single"], pd["consumer"]
    assert isinstance(single, VllmServer) and isinstance(consumer, VllmServer)
    seed = {"completions": 10, "chat": 20}[api] + int(stream)
    prompt = text_of(700, seed=seed)
    args = {"model": "model", "max_tokens": 12, "temperature": 0}
    loaded = counter(consumer, "loaded_blocks")

    def ask(url: str, stream: bool) -> str:
        c = client(url)
        if api == "chat":
            messages = [{"role": "user", "content": prompt}]
            if stream:
                return _stream_text(c.chat.completions.create(messages=messages, stream=True, **args), True)
            return c.chat.completions.create(messages=messages, **args).choices[0].message.content or ""
        if stream:
            return _stream_text(c.completions.create(prompt=prompt, stream=True, **args), False)
        return c.completions.create(prompt=prompt, **args).choices[0].text

    reference = ask(single.url, False)
    assert ask(str(pd["router"]), stream) == reference
    assert wait_counter(consumer, "loaded_blocks", loaded) > loaded, "the decode side recomputed"


def test_pd_second_turn_loads_the_first_turns_prompt_on_the_prefill_side(pd: dict[str, object]) -> None:
    """The prefill pod of turn 2 loads turn 1's prompt from the store (whoever computed it) and
    computes only the new turn; the answer still equals a single server's."""
    single, producer = pd["single"], pd["producer"]
    assert isinstance(single, VllmServer) and isinstance(producer, VllmServer)
    args = {"model": "model", "max_tokens": 8, "temperature": 0}
    messages = [{"role": "user", "content": text_of(700, seed=30)}]
    first = client(str(pd["router"])).chat.completions.create(messages=messages, **args)  # type: ignore[arg-type]
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": text_of(60, seed=31)}]
    time.sleep(1.0)  # turn 1's stats reach /metrics with the next stats update
    hits = counter(producer, "hit_tokens")
    second = client(str(pd["router"])).chat.completions.create(messages=messages, **args)  # type: ignore[arg-type]
    reference = client(single.url).chat.completions.create(messages=messages, **args)  # type: ignore[arg-type]
    assert second.choices[0].message.content == reference.choices[0].message.content
    assert wait_counter(producer, "hit_tokens", hits) - hits >= 20 * BLOCK, "the prefill side recomputed turn 1"


# ---------------------------------------------------------------- bad configuration, full store


def _fails_naming(server: VllmServer, needle: str) -> None:
    server.start()
    try:
        code = server.wait_exit(240)
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert code != 0
    assert needle in log, f"{server.name}: {needle!r} not in the log tail:\n{server.log_tail()}"


def test_bad_configuration_fails_at_startup_naming_the_key(model: Path, work: Path) -> None:
    blocker = work / "a-file"
    blocker.write_text("not a directory")
    unwritable = ucm_server(model, work, "unwritable", blocker / "store")
    unknown = ucm_server(model, work, "unknown-key", work / "s2", extra={"kv_layout": "NHD"})
    _fails_naming(unknown, "kv_connector_extra_config: unknown key(s) kv_layout")
    _fails_naming(unwritable, str(blocker / "store"))


@pytest.fixture
def tiny_tmpfs(work: Path) -> Iterator[Path]:
    mount = work / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_store_keeps_serving_by_recompute(model: Path, work: Path, tiny_tmpfs: Path) -> None:
    with ucm_server(model, work, "full", tiny_tmpfs / "store") as server:
        answers = [complete(server.url, text_of(600, seed=30 + i)) for i in range(3)]
        again = complete(server.url, text_of(600, seed=30))
    assert again == answers[0]
    log = server.log_path.read_text(errors="replace")
    assert "dumps are now refused, loads continue" in log and "ENOSPC" in log
