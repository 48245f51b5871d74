"""`ucm bench serve`: time to first token of real `vllm serve` processes, every row in one run.

Rows (same model, float32, same workload, one `VllmServer` recipe):

* recompute - no connector, vLLM's prefix cache off: every prompt token is computed;
* vllm-prefix-cache - no connector, vLLM's in-memory prefix cache; the workload runs once to warm
  it and the replay is measured (the cache a restart loses);
* example-connector - vLLM's own ExampleConnector on the same disk, prefix cache off; warmed
  the same way, so its hits come from its files;
* ucm-cold - UCMConnector kv_both on a fresh store, the first pass (turn 1 and question 1 miss);
* ucm-warm-restart - that server stopped, a new one started on the same store, the workload
  replayed: with the prefix cache off every hit comes from the store;
* ucm-pd-router - a kv_producer and a kv_consumer on that store behind `ucm router serve`; the
  prefill side loads the stored prefix, the decode side the prefill's dump.

The miss path is measured apart from the rows: unique prompts (no shared prefix, not even the
system prompt) on the recompute server and on the ucm-cold server, so "overhead" is what looking
up, missing and saving costs a request the store cannot help.

Workloads are built from offline text (this repo's Markdown files, then Python's stdlib sources),
cut by token count with the model's tokenizer, in an order fixed by `--seed`:

* multi-turn chat - a system prompt, `--turns` user turns each carrying a slice of the text, the
  history (with the server's own greedy answers) resent each turn, `--context-tokens` in all;
* long-document questions - one document of `--context-tokens` tokens, `--questions` questions.

TTFT is the time from sending a streaming chat request to its first content chunk; each server
gets one unmeasured full-length request first so no row pays the first-request allocations. Servers
run one core each (`cpu_threads=1`), one at a time (the PD pair together), each phase in its
own `try`, so a server that fails fails only its rows; all are stopped in `finally`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Any, Protocol, cast

from ucm.bench.common import percentile
from ucm.serve.server import RouterProcess, VllmServer, start_all, ucm_transfer_config

SYSTEM_PROMPT = "You are a careful assistant. Answer briefly, using only the text the user gives you."
QUESTIONS = (
    "What is the main purpose of the text above?",
    "Which commands or functions does the text mention?",
    "Summarise the text in one sentence.",
    "What would a new user need to know first?",
    "Which limitations or caveats does the text describe?",
    "List three technical terms used in the text.",
)
UCM_HIT_METRIC = "vllm:ucm_hit_tokens"
PREFIX_HIT_METRIC = "vllm:prefix_cache_hits"
EXTERNAL_HIT_METRIC = "vllm:external_prefix_cache_hits"
PREFILL_SUM = "ucm_router_prefill_duration_seconds_sum"
PREFILL_COUNT = "ucm_router_prefill_duration_seconds_count"

Messages = list[dict[str, str]]


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


# ---- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    model: Path
    context_tokens: int
    questions: int
    turns: int
    max_tokens: int
    unique_prompts: int
    seed: int
    work_dir: Path
    keep: bool
    json: str | None  # None: no JSON; "-": stdout; else a file path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: `ucm model` smollm2, tiny-llama with --quick)")
    parser.add_argument("--context-tokens", type=int, default=None,
                        help="tokens of the document and of the whole chat history (default 4096)")
    parser.add_argument("--questions", type=int, default=None, help="questions over the document (default 3)")
    parser.add_argument("--turns", type=int, default=None, help="chat turns (default 4)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 16)")
    parser.add_argument("--unique-prompts", type=int, default=None,
                        help="unique prompts (context/2 tokens each) for the miss-path overhead (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="orders the text the workloads are cut from")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="stores and logs go here (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (stores, logs)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write the result as a JSON document: to PATH, or after the table on stdout")
    parser.add_argument("--quick", action="store_true",
                        help="a fast check: tiny-llama, 1024 tokens, 1 question, 2 turns, 4 tokens per answer")
    parser.set_defaults(func=main)


def resolve(args: argparse.Namespace) -> Settings:
    """Flags over the --quick or the default profile; flags given explicitly always win."""
    quick = bool(args.quick)
    profile = {"context_tokens": 1024, "questions": 1, "turns": 2, "max_tokens": 4, "unique_prompts": 2} \
        if quick else {"context_tokens": 4096, "questions": 3, "turns": 4, "max_tokens": 16, "unique_prompts": 4}
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in profile.items()}
    if args.model is not None:
        model = Path(args.model)
    else:
        from ucm.serve.models import prepare
        model = prepare("tiny-llama" if quick else "smollm2")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="ucm-bench-serve-"))
    return Settings(model=model.resolve(), seed=args.seed, work_dir=Path(work_dir), keep=bool(args.keep),
                    json=args.json, **values)


# ---- workload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """User turns sent in order; with `keep_history` each turn resends the previous turns and answers."""

    name: str
    system: str
    turns: tuple[str, ...]
    keep_history: bool = True


@dataclass(frozen=True)
class Workloads:
    chat: Conversation
    documents: tuple[Conversation, ...]
    unique: tuple[Conversation, ...]
    warm_up: Conversation

    @property
    def measured(self) -> tuple[Conversation, ...]:
        return (self.chat, *self.documents)


def text_sources(seed: int) -> Iterator[str]:
    """Offline natural text: this repo's Markdown (shuffled by `seed`), then stdlib sources."""
    root = Path(__file__).resolve().parents[2]
    markdown = sorted(p for p in root.glob("**/*.md") if ".venv" not in p.parts and ".cache" not in p.parts)
    Random(seed).shuffle(markdown)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    Random(seed + 1).shuffle(stdlib)
    for path in [*markdown, *stdlib]:
        try:
            yield path.read_text(errors="replace")
        except OSError:
            continue


class TokenPool:
    """Consecutive, non-overlapping slices of the text, so no two prompts share a prefix by accident."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.sources = text_sources(seed)
        self.ids: list[int] = []

    def take(self, tokens: int) -> str:
        while len(self.ids) < tokens:
            self.ids += self.tokenizer.encode(next(self.sources), add_special_tokens=False)
        chunk, self.ids = self.ids[:tokens], self.ids[tokens:]
        return self.tokenizer.decode(chunk)


def build_workloads(tokenizer: Tokenizer, s: Settings) -> Workloads:
    pool = TokenPool(tokenizer, s.seed)
    per_turn = max(1, s.context_tokens // s.turns)
    chat = Conversation("chat", SYSTEM_PROMPT, tuple(
        f"Part {i + 1} of my notes:\n\n{pool.take(per_turn)}\n\n{QUESTIONS[i % len(QUESTIONS)]}"
        for i in range(s.turns)))
    document = pool.take(s.context_tokens)
    documents = tuple(
        Conversation(f"doc-q{i + 1}", SYSTEM_PROMPT, (f"Document:\n\n{document}\n\n{QUESTIONS[i % len(QUESTIONS)]}",))
        for i in range(s.questions))
    # a nonce first in the system prompt: not even the chat template's first block is shared
    unique = tuple(
        Conversation(f"unique-{i + 1}", f"[{i}-{s.seed}] {SYSTEM_PROMPT}",
                     (f"{pool.take(max(1, s.context_tokens // 2))}\n\n{QUESTIONS[0]}",))
        for i in range(s.unique_prompts))
    warm_up = Conversation("warm-up", f"[warm-up-{s.seed}] {SYSTEM_PROMPT}",
                           (f"{pool.take(s.context_tokens)}\n\n{QUESTIONS[0]}",))
    return Workloads(chat, documents, unique, warm_up)


# ---- measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    request: str
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int
    answer: str


def stream_chat(base_url: str, messages: Messages, max_tokens: int, name: str) -> Sample:
    """One greedy streaming request; TTFT is the first chunk with content, usage from the last chunk."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=600, max_retries=0)
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    prompt_tokens = completion_tokens = 0
    stream = client.chat.completions.create(
        model="model", messages=cast(Any, messages), max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            prompt_tokens, completion_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
    ended = time.perf_counter()
    return Sample(name, (first or ended) - started, ended - started, prompt_tokens, completion_tokens, "".join(parts))


def run_conversations(base_url: str, conversations: Sequence[Conversation], max_tokens: int,
                      label: str) -> list[Sample]:
    """Every turn of every conversation in order, one request at a time, a progress bar on stderr."""
    from tqdm import tqdm

    samples: list[Sample] = []
    with tqdm(total=sum(len(c.turns) for c in conversations), desc=label, file=sys.stderr,
              leave=True, unit="req") as bar:
        for conv in conversations:
            messages: Messages = [{"role": "system", "content": conv.system}]
            for i, turn in enumerate(conv.turns):
                if not conv.keep_history:
                    messages = messages[:1]
                messages.append({"role": "user", "content": turn})
                sample = stream_chat(base_url, messages, max_tokens, f"{conv.name}.{i + 1}")
                messages.append({"role": "assistant", "content": sample.answer})
                samples.append(sample)
                bar.set_postfix_str(f"ttft {sample.ttft_s * 1000:.0f} ms, prompt {sample.prompt_tokens}")
                bar.update()
    return samples


def warm_up(base_url: str, conversation: Conversation) -> None:
    """One unmeasured full-length request: the first long prompt of a fresh server pays one-off
    allocations (a short one does not: in a first try the first measured row was 2x slower)."""
    messages = [{"role": "system", "content": conversation.system},
                {"role": "user", "content": conversation.turns[0]}]
    stream_chat(base_url, messages, 1, conversation.name)


def metric(servers: Sequence[VllmServer], name: str) -> float | None:
    """`name` summed over servers (prometheus_client may add `_total`); None when no server exports it."""
    found: float | None = None
    for server in servers:
        values = server.metrics()
        for key in (name, name + "_total"):
            if key in values:
                found = (found or 0.0) + values[key]
                break
    return found


def measure_pass(base_url: str, servers: Sequence[VllmServer], conversations: Sequence[Conversation],
                 max_tokens: int, label: str, hit_metric: str | None) -> tuple[list[Sample], float | None]:
    """A pass's samples and the growth of `hit_metric` over it."""
    before = metric(servers, hit_metric) if hit_metric else None
    samples = run_conversations(base_url, conversations, max_tokens, label)
    if hit_metric is None:
        return samples, None
    time.sleep(1.0)  # the stat loggers record the last step's counters after its output is sent
    after = metric(servers, hit_metric)
    return samples, None if after is None else after - (before or 0.0)


# ---- results -------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    description: str
    samples: list[Sample] = field(default_factory=list)
    hit_tokens: float | None = None
    error: str | None = None
    prefill_leg_s: float | None = None  # PD only: mean prefill round trip the router measured

    @property
    def ttft_p50(self) -> float:
        return percentile([s.ttft_s for s in self.samples], 0.5)

    def summary(self, baseline: Row | None) -> dict[str, Any]:
        ttft = [s.ttft_s for s in self.samples]
        e2e = sum(s.e2e_s for s in self.samples)
        ratio = baseline.ttft_p50 / self.ttft_p50 if baseline and baseline.samples and self.samples else None
        return {
            "row": self.name, "description": self.description, "requests": len(self.samples),
            "ttft_p50_ms": percentile(ttft, 0.5) * 1000, "ttft_p90_ms": percentile(ttft, 0.9) * 1000,
            "e2e_p50_ms": percentile([s.e2e_s for s in self.samples], 0.5) * 1000,
            "output_tokens_per_s": sum(s.completion_tokens for s in self.samples) / e2e if e2e else 0.0,
            "prompt_tokens": sum(s.prompt_tokens for s in self.samples),
            "hit_tokens": self.hit_tokens, "ttft_speedup_vs_recompute": ratio, "error": self.error,
            "prefill_leg_mean_ms": None if self.prefill_leg_s is None else self.prefill_leg_s * 1000,
            "samples": [asdict(s) | {"answer": s.answer[:80]} for s in self.samples],
        }


@dataclass
class Goal:
    name: str
    met: bool | None
    detail: str


def goals(rows: dict[str, Row]) -> list[Goal]:
    """The issue's targets, each with the numbers it was judged on (None: a row it needs failed)."""
    def p50(key: str) -> float | None:
        row = rows.get(key)
        return row.ttft_p50 if row is not None and row.samples else None

    warm, recompute, example, pd, miss_base, miss_ucm = (p50(k) for k in (
        "ucm-warm-restart", "recompute", "example-connector", "ucm-pd-router", "miss-recompute", "miss-ucm"))
    out: list[Goal] = []

    def speedup(name: str, base: float | None, target: float, base_name: str) -> None:
        if base is None or warm is None:
            out.append(Goal(name, None, "not measured"))
        else:
            out.append(Goal(name, base / warm >= target,
                            f"{base_name} {base * 1000:.0f} ms / ucm-warm {warm * 1000:.0f} ms = {base / warm:.2f}x"))

    speedup("UCM warm TTFT >= 5x better than recompute", recompute, 5.0, "recompute")
    speedup("UCM warm TTFT >= 1.5x better than ExampleConnector", example, 1.5, "example-connector")
    floor = p50("vllm-prefix-cache")
    if example is not None and warm is not None and floor is not None:
        # what loading costs over a cache that loads nothing: the part a faster load can remove
        out[-1].detail += (f"; over the in-memory prefix cache's {floor * 1000:.0f} ms the load adds "
                           f"{(example - floor) * 1000:.0f} ms (ExampleConnector) vs {(warm - floor) * 1000:.0f} ms "
                           f"(UCM); a free load would be at most {example / floor:.2f}x better")
    if miss_base is None or miss_ucm is None:
        out.append(Goal("miss-path overhead <= 3%", None, "not measured"))
    else:
        overhead = miss_ucm / miss_base - 1
        out.append(Goal("miss-path overhead <= 3%", overhead <= 0.03,
                        f"unique prompts: ucm {miss_ucm * 1000:.0f} ms vs recompute {miss_base * 1000:.0f} ms "
                        f"= {overhead * 100:+.1f}%"))
    if pd is None or warm is None:
        out.append(Goal("PD TTFT within 10% of a single server's hit", None, "not measured"))
    else:
        leg = rows["ucm-pd-router"].prefill_leg_s
        profile = "" if leg is None else (
            f"; of a PD first token, the prefill leg (load the prefix, compute the tail, hand off) "
            f"takes {leg * 1000:.0f} ms on average, the decode leg (load it again, first token) the rest")
        out.append(Goal("PD TTFT within 10% of a single server's hit", pd <= warm * 1.10,
                        f"pd {pd * 1000:.0f} ms vs ucm-warm {warm * 1000:.0f} ms = {(pd / warm - 1) * 100:+.1f}%"
                        + profile))
    return out


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    header = ("row", "req", "TTFT p50 ms", "TTFT p90 ms", "e2e p50 ms", "out tok/s", "hit tokens",
              "prompt tok", "TTFT vs recompute")
    lines = [header]
    for s in summaries:
        if s["error"]:
            lines.append((s["row"], "FAILED", s["error"].splitlines()[0][:60], "", "", "", "", "", ""))
            continue
        hits = "-" if s["hit_tokens"] is None else f"{s['hit_tokens']:.0f}"
        ratio = "-" if s["ttft_speedup_vs_recompute"] is None else f"{s['ttft_speedup_vs_recompute']:.2f}x"
        lines.append((s["row"], str(s["requests"]), f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p90_ms']:.0f}",
                      f"{s['e2e_p50_ms']:.0f}", f"{s['output_tokens_per_s']:.1f}", hits,
                      str(s["prompt_tokens"]), ratio))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


# ---- processes -----------------------------------------------------------------------------------


class Fleet:
    """Every server and router this run started, so `finally` can stop all of them."""

    def __init__(self, s: Settings, warm_up: Conversation) -> None:
        self.s = s
        self.warm_up = warm_up
        self.servers: list[VllmServer] = []
        self.routers: list[RouterProcess] = []

    def server(self, name: str, **kwargs: Any) -> VllmServer:
        server = VllmServer(model=self.s.model, log_dir=self.s.work_dir / "logs", name=name, cpu_threads=1,
                            **kwargs)
        self.servers.append(server)
        return server

    def start(self, *servers: VllmServer) -> None:
        print(f"starting {', '.join(s.name for s in servers)} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        start_all(servers)
        for server in servers:
            warm_up(server.url, self.warm_up)
        print(f"ready after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    def router(self, producer: VllmServer, consumer: VllmServer) -> RouterProcess:
        """`ucm router serve` in front of the pair, once it answers."""
        router = RouterProcess(prefill=[producer.url], decode=[consumer.url], log_dir=self.s.work_dir / "logs")
        self.routers.append(router)
        return router.start()

    def stop(self, *servers: VllmServer) -> None:
        for server in servers or tuple(self.servers):
            server.stop()

    def stop_all(self) -> None:
        for router in self.routers:
            router.stop()
        self.stop()


@contextmanager
def phase(rows: dict[str, Row], *names: str) -> Iterator[None]:
    """A failed server start or request marks the phase's unmeasured rows failed; the run goes on.

    Any Exception: the openai client's errors are not ServerError; Ctrl-C (KeyboardInterrupt) is not
    an Exception and ends the run.
    """
    try:
        yield
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        print(f"FAILED {', '.join(names)}: {message}", file=sys.stderr, flush=True)
        for name in names:
            if not rows[name].samples:
                rows[name].error = message


ROWS = {
    "recompute": "no connector, prefix cache off",
    "vllm-prefix-cache": "no connector, vLLM in-memory prefix cache (replay after a warm-up pass)",
    "example-connector": "vLLM ExampleConnector on disk, prefix cache off, no chunked prefill (replay after warm-up)",
    "ucm-cold": "UCMConnector kv_both, fresh store, first pass",
    "ucm-warm-restart": "UCMConnector kv_both, new server on the same store, replay",
    "ucm-pd-router": "kv_producer + kv_consumer on the same store behind ucm router (hits: prefill side)",
}
# the miss path: unique prompts, reported in their own table
MISS_ROWS = {"miss-recompute": "unique prompts, no connector", "miss-ucm": "unique prompts, UCMConnector kv_both"}


def run_rows(s: Settings, fleet: Fleet, w: Workloads) -> dict[str, Row]:
    """Every phase in order, one server (two for PD) at a time: a server that fails fails only its
    own rows, and no row shares the two cores with another server's work."""
    rows = {name: Row(name, desc) for name, desc in (ROWS | MISS_ROWS).items()}
    measured, n = w.measured, s.max_tokens
    model_id = s.model.name
    store = s.work_dir / "ucm-store"

    def pass_into(row: Row, server: VllmServer, metric_name: str | None, servers: Sequence[VllmServer] = (),
                  url: str | None = None, conversations: Sequence[Conversation] = measured) -> None:
        row.samples, row.hit_tokens = measure_pass(url or server.url, servers or (server,), conversations, n,
                                                   row.name, metric_name)

    def serving(names: Sequence[str], body: Callable[[VllmServer], None], **kwargs: Any) -> None:
        """One server for `names`' rows, stopped before the next phase starts."""
        server = fleet.server(names[0], **kwargs)
        with phase(rows, *names):
            try:
                fleet.start(server)
                body(server)
            finally:
                fleet.stop(server)

    def ucm(role: str) -> dict[str, Any]:
        return ucm_transfer_config(role, store, model_id=model_id)

    def recompute(server: VllmServer) -> None:
        pass_into(rows["miss-recompute"], server, None, conversations=w.unique)
        pass_into(rows["recompute"], server, None)

    def replayed(row: str, hit_metric: str) -> Callable[[VllmServer], None]:
        def body(server: VllmServer) -> None:
            run_conversations(server.url, measured, n, f"{row} warm-up")
            pass_into(rows[row], server, hit_metric)
        return body

    def cold(server: VllmServer) -> None:
        pass_into(rows["miss-ucm"], server, None, conversations=w.unique)
        pass_into(rows["ucm-cold"], server, UCM_HIT_METRIC)

    def warm(server: VllmServer) -> None:
        pass_into(rows["ucm-warm-restart"], server, UCM_HIT_METRIC)

    example_config = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                      "kv_connector_extra_config": {"shared_storage_path": str(s.work_dir / "example-store")}}
    serving(("recompute", "miss-recompute"), recompute)
    serving(("vllm-prefix-cache",), replayed("vllm-prefix-cache", PREFIX_HIT_METRIC), prefix_caching=True)
    # ExampleConnector keeps only the last chunk of a chunked prefill and dies loading it (shape
    # mismatch [2048, ...] vs [4096, ...] at 4K tokens), so it runs with the whole prompt in one step.
    serving(("example-connector",), replayed("example-connector", EXTERNAL_HIT_METRIC),
            kv_transfer_config=example_config, extra_args=["--max-num-batched-tokens", "8192"])
    serving(("ucm-cold", "miss-ucm"), cold, kv_transfer_config=ucm("kv_both"))
    serving(("ucm-warm-restart",), warm, kv_transfer_config=ucm("kv_both"))

    # PD on the same (warm) store: the prefill side loads what is stored, the decode side the rest
    producer = fleet.server("ucm-producer", kv_transfer_config=ucm("kv_producer"))
    consumer = fleet.server("ucm-consumer", kv_transfer_config=ucm("kv_consumer"))
    with phase(rows, "ucm-pd-router"):
        try:
            fleet.start(producer, consumer)
            router = fleet.router(producer, consumer)
            warm_up(router.url, fleet.warm_up)
            before = router.metrics()
            pass_into(rows["ucm-pd-router"], producer, UCM_HIT_METRIC, url=router.url)
            after = router.metrics()
            # the profile of a PD first token: the prefill leg (router -> prefill -> hand-off) is
            # the router's own histogram; the rest is the decode leg and the router's hops
            legs = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in (PREFILL_SUM, PREFILL_COUNT)}
            if legs[PREFILL_COUNT]:
                rows["ucm-pd-router"].prefill_leg_s = legs[PREFILL_SUM] / legs[PREFILL_COUNT]
        finally:
            fleet.stop_all()
    return rows


def report(s: Settings, rows: dict[str, Row]) -> tuple[str, dict[str, Any]]:
    summaries = [rows[name].summary(rows["recompute"]) for name in ROWS]
    miss_summaries = [rows[name].summary(rows["miss-recompute"]) for name in MISS_ROWS]
    checks = goals(rows)
    text = "\n".join([
        f"ucm bench serve: model {s.model.name}, {s.context_tokens} context tokens, {s.turns} chat turns, "
        f"{s.questions} document questions, {s.max_tokens} tokens per answer, float32, 1 CPU thread per server",
        "TTFT/e2e over the measured pass of each row; hit tokens: vllm:ucm_hit_tokens (ucm rows), "
        "vllm:prefix_cache_hits (prefix cache), vllm:external_prefix_cache_hits (ExampleConnector)",
        "",
        format_table(summaries),
        "",
        f"miss path ({s.unique_prompts} unique prompts of ~{s.context_tokens // 2} tokens):",
        format_table(miss_summaries),
        "",
        "goals:",
        *(f"  {'n/a   ' if g.met is None else 'MET   ' if g.met else 'MISSED'} {g.name}: {g.detail}"
          for g in checks),
    ])
    document = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "rows": summaries, "miss_path": miss_summaries,
        "goals": [asdict(g) for g in checks],
    }
    return text, document


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(args: argparse.Namespace) -> int:
    s = resolve(args)
    from transformers import AutoTokenizer

    tokenizer = cast(Tokenizer, AutoTokenizer.from_pretrained(str(s.model)))
    workloads = build_workloads(tokenizer, s)
    fleet = Fleet(s, workloads.warm_up)
    previous: Callable[..., Any] | int | None = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        rows = run_rows(s, fleet, workloads)
    finally:
        fleet.stop_all()
        signal.signal(signal.SIGTERM, previous)
        if s.keep:
            print(f"kept {s.work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(s.work_dir, ignore_errors=True)
    text, document = report(s, rows)
    print(text, flush=True)
    if s.json == "-":
        print(json.dumps(document, indent=2))
    elif s.json:
        Path(s.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(not row.error for row in rows.values()) else 1
