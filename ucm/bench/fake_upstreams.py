"""A small OpenAI-compatible upstream that follows vLLM's `kv_transfer_params` protocol.

It stands in for a vLLM server (which needs a GPU and weights) in the router's tests and
benchmark. It checks what the router sends, the way a vLLM engine with a PD connector would
depend on it:

* role `prefill` requires `max_tokens == 1`, `stream: false`, no `stream_options`, and
  `kv_transfer_params.do_remote_decode == true`; it answers one token plus `kv_transfer_params`
  `{"do_remote_prefill": true, "do_remote_decode": false, "remote_engine_id": <its name>, ...}`;
* role `decode` accepts params only with `do_remote_prefill: true` and a `remote_engine_id`
  (recorded, so tests can see which prefill it was paired with); with `require_kv_params` it
  rejects requests without them; it streams `data: {chunk}` events, a usage chunk when
  `stream_options.include_usage` is set, and `data: [DONE]`.

Fault knobs (`FakeBehavior`) make it slow, hang, fail with a status, break a stream mid-event,
or fail its health check. `python -m ucm.bench.fake_upstreams` runs a set of them in one process
for the benchmark. It serves over `ucm.bench.fake_http` (a lean protocol-level server), since in
the benchmark it shares a CPU with the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal

from ucm.bench.fake_http import Exchange, HttpServer
from ucm.router.endpoints import Endpoint, Role
from ucm.router.loop import run

UpstreamRole = Literal["prefill", "decode", "both"]


@dataclasses.dataclass
class FakeBehavior:
    tokens: int | None = None  # tokens per answer (default: max_tokens, at most 16)
    token_delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    fail_status: int | None = None  # answer every completion request with this status
    break_after_tokens: int | None = None  # decode: drop the connection mid-event after N tokens
    break_after_done: bool = False  # decode: drop the connection after `data: [DONE]`, before the body's end
    hang: bool = False  # never answer (timeout tests)
    healthy: bool = True
    require_kv_params: bool = False


@dataclasses.dataclass
class RecordedRequest:
    path: str
    body: dict[str, Any]
    headers: Mapping[str, str]  # case-insensitive


class FakeUpstream:
    def __init__(
        self,
        role: UpstreamRole,
        name: str,
        behavior: FakeBehavior | None = None,
        model: str = "fake-model",
        record: bool = True,
    ) -> None:
        self.role = role
        self.name = name
        self.behavior = behavior or FakeBehavior()
        self.model = model
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.cancelled = 0  # requests whose client (the router) went away mid-answer
        self.completed = 0
        self.active = 0
        self.url = ""
        self._server: HttpServer | None = None

    def endpoint(self, revision: str = "r1", created: float = 0.0) -> Endpoint:
        """This server as a discovered endpoint of `revision`."""
        role: Role = "prefill" if self.role == "prefill" else "decode"
        return Endpoint(self.url, role, revision, name=self.name, created=created)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = HttpServer(self._route)
        port = await self._server.start(host, port)
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    async def _route(self, ex: Exchange) -> None:
        if ex.method == "POST" and ex.path in ("/v1/completions", "/v1/chat/completions"):
            await self._completions(ex)
        elif ex.method == "GET" and ex.path == "/health":
            ex.respond_json({}, status=200 if self.behavior.healthy else 503)
        elif ex.method == "GET" and ex.path == "/v1/models":
            ex.respond_json({"object": "list", "data": [{"id": self.model, "object": "model"}]})
        else:
            _error(ex, 404, f"{self.name}: no route {ex.method} {ex.path}")

    async def _completions(self, ex: Exchange) -> None:
        self.active += 1
        try:
            await self._answer(ex)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _answer(self, ex: Exchange) -> None:
        body = ex.json()
        if self.record:
            self.requests.append(RecordedRequest(ex.path, body, ex.headers.copy()))
        b = self.behavior
        if b.hang:
            await asyncio.sleep(3600)
        if b.fail_status is not None:
            return _error(ex, b.fail_status, f"{self.name}: configured to fail")
        chat = ex.path.endswith("/chat/completions")
        params = body.get("kv_transfer_params")
        if self.role == "prefill" or (self.role == "both" and params and params.get("do_remote_decode")):
            problem = _check_prefill(body, chat)
            if problem:
                return _error(ex, 400, f"{self.name} (prefill): {problem}")
            if b.prefill_delay_s:
                await asyncio.sleep(b.prefill_delay_s)
            return self._prefill_answer(ex, chat)
        if params is not None:
            if not (
                isinstance(params, dict)
                and params.get("do_remote_prefill") is True
                and params.get("remote_engine_id")
            ):
                return _error(
                    ex,
                    400,
                    f"{self.name} (decode): kv_transfer_params lack do_remote_prefill/remote_engine_id",
                )
        elif b.require_kv_params:
            return _error(ex, 400, f"{self.name} (decode): no kv_transfer_params from a prefill")
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        n = b.tokens if b.tokens is not None else min(int(limit), 16)
        if body.get("stream"):
            return await self._stream(ex, body, chat, n)
        text = "".join(f" t{i}" for i in range(n))
        self.completed += 1
        ex.respond_json(_whole(self.model, chat, text, n, served_by=self.name))

    def _prefill_answer(self, ex: Exchange, chat: bool) -> None:
        answer = _whole(self.model, chat, " t0", 1, served_by=self.name)
        answer["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.name,
            "remote_request_id": ex.headers.get("X-Request-Id", ""),
            "remote_block_ids": [[0, 1]],
            "remote_host": "127.0.0.1",
            "remote_port": 0,
        }
        self.completed += 1
        ex.respond_json(answer)

    async def _stream(self, ex: Exchange, body: dict[str, Any], chat: bool, n: int) -> None:
        ex.start_stream("text/event-stream; charset=utf-8")
        b = self.behavior
        # test-double knobs a client may set per request (vLLM itself ignores unknown fields)
        delay = float(body.get("fake_token_delay_s", b.token_delay_s))
        stamp = bool(body.get("fake_stamp", False))
        first, events = _stream_events(self.model, chat, n, int(time.time()))
        if first:
            ex.send(first)
        for i, event in enumerate(events):
            if b.break_after_tokens is not None and i == b.break_after_tokens:
                ex.send(b'data: {"id": "fake-1", "choi')  # half an event, then the crash
                ex.abort()
                return
            # CLOCK_MONOTONIC is system-wide: a client on this host can diff the stamp
            ex.send(event + (b', "t_sent": %r}\n\n' % time.monotonic() if stamp else b"}\n\n"))
            if delay and i < n - 1:  # the first token leaves at once, like a decode after its KV load
                await asyncio.sleep(delay)
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            base = _chunk_base(self.model, chat, int(time.time()))
            ex.send(_event({**base, "choices": [], "usage": _usage(n), "served_by": self.name}))
        ex.send(b"data: [DONE]\n\n")
        if b.break_after_done:
            ex.abort()
            return
        ex.end_stream()
        self.completed += 1


def _chunk_base(model: str, chat: bool, created: int) -> dict[str, Any]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": "fake-1", "object": kind, "created": created, "model": model}


@functools.lru_cache(maxsize=64)
def _stream_events(model: str, chat: bool, n: int, created: int) -> tuple[bytes, tuple[bytes, ...]]:
    """(the chat role event or b"", each token event without its closing `}` and blank line):
    the same for every stream of one second, so rendered once (the bench's upstreams share a
    CPU with its load generator)."""
    base = _chunk_base(model, chat, created)
    first = b""
    if chat:
        first = _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    events = []
    for i in range(n):
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
        if chat:
            choice["delta"] = {"content": f" t{i}"}
        else:
            choice["text"] = f" t{i}"
        events.append(b"data: " + json.dumps({**base, "choices": [choice]}).encode()[:-1])
    return first, tuple(events)


def _check_prefill(body: dict[str, Any], chat: bool) -> str | None:
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict) or params.get("do_remote_decode") is not True:
        return "kv_transfer_params.do_remote_decode must be true"
    if params.get("do_remote_prefill") is not False:
        return "kv_transfer_params.do_remote_prefill must be false"
    if body.get("max_tokens") != 1:
        return f"max_tokens must be 1, got {body.get('max_tokens')!r}"
    if chat and body.get("max_completion_tokens") != 1:
        return f"max_completion_tokens must be 1, got {body.get('max_completion_tokens')!r}"
    if body.get("stream") is not False:
        return "stream must be false"
    for field in ("stream_options", "min_tokens", "min_completion_tokens"):
        if field in body:
            return f"{field} must not be sent to prefill"
    return None


def _usage(n: int) -> dict[str, int]:
    return {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}


def _whole(model: str, chat: bool, text: str, n: int, served_by: str) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
    return {
        "id": "fake-1",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(n),
        "served_by": served_by,
    }


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (asserts every event is well formed)."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), f"malformed SSE event: {block!r}"
        events.append(block[len("data: ") :])
    return events


def metric_value(text: str, sample: str) -> float:
    """Value of one sample (`name{labels}` exactly as rendered) in a Prometheus text body."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _error(ex: Exchange, status: int, message: str) -> None:
    err = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    ex.respond_json(err, status=status)


# ---- `python -m ucm.bench.fake_upstreams`: upstreams for the benchmark, in their own process ----
async def _serve_forever(args: argparse.Namespace) -> None:
    behavior = FakeBehavior(tokens=args.tokens, token_delay_s=args.token_delay_s)
    servers = [
        FakeUpstream("prefill", f"prefill-{i}", behavior, model=args.model, record=False)
        for i in range(args.prefill)
    ]
    servers += [
        FakeUpstream("decode", f"decode-{i}", behavior, model=args.model, record=False)
        for i in range(args.decode)
    ]
    urls = [await s.start() for s in servers]
    print(json.dumps({"prefill": urls[: args.prefill], "decode": urls[args.prefill :]}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        await s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ucm.bench.fake_upstreams", description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--model", default="fake-model")
    args = parser.parse_args(argv)
    run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
