"""Regression tests for bodies and connections that used to get aiohttp's plain-text errors, a
500, or no answer at all: deep nesting, huge integers, unpaired surrogates, out-of-range token
ids, header limits, slow clients, unknown routes, malformed HTTP and bodies."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ucm.bench.fake_upstreams import FakeUpstream, metric_value
from ucm.router.cli import add_serve_arguments, build_config
from ucm.router.config import RouterConfig
from ucm.router.errors import ApiError
from ucm.router.openai_request import MAX_JSON_DEPTH, build_decode_body, parse_request
from ucm.router.server import RouterServer

MODEL = "fake-model"
MakeUpstream = Callable[..., Awaitable[FakeUpstream]]  # the fixtures of tests/router/conftest.py
MakeRouter = Callable[..., Awaitable[RouterServer]]


# ---- raw HTTP over loopback -----------------------------------------------------------------
class RawAnswer:
    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers = {
            k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        self.body = body

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        """The OpenAI error object of this answer (asserting the shape)."""
        err = self.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        return err  # type: ignore[no-any-return]


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> RawAnswer:
    """One HTTP answer framed by Content-Length (every error the router writes has one)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    answer = RawAnswer(head[:-4], b"")
    size = int(answer.headers.get("content-length", "0"))
    answer.body = await asyncio.wait_for(reader.readexactly(size), timeout)
    return answer


async def exchange(router: RouterServer, data: bytes) -> RawAnswer:
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    try:
        writer.write(data)
        return await read_answer(reader)
    finally:
        writer.close()


def post_request(body: bytes, path: str = "/v1/completions", extra: bytes = b"") -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n%bContent-Length: %d\r\n\r\n%b"
        % (path.encode(), extra, len(body), body)
    )


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the router closed the connection (EOF, after anything still unread)."""
    return await asyncio.wait_for(reader.read(), 10) == b""


# ---- bodies ---------------------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b'{"model": "fake-model", "prompt": "x", "extra": ' + b"[" * depth + b"]" * depth + b"}"


def test_nesting_limit_in_the_parser() -> None:
    # the object itself is one level, so `extra` may nest MAX_JSON_DEPTH - 1 arrays
    assert parse_request(nested(MAX_JSON_DEPTH - 1), "completions", MODEL, 1024).body["prompt"] == "x"
    for depth in (MAX_JSON_DEPTH, 900, 100_000):  # past the limit; the last past the interpreter's
        with pytest.raises(ApiError) as info:
            parse_request(nested(depth), "completions", MODEL, 1024)
        assert info.value.status == 400 and f"more than {MAX_JSON_DEPTH} levels" in info.value.message


async def test_deep_nesting_gets_400_json(make_upstream: MakeUpstream, make_router: MakeRouter) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d])
    for depth in (MAX_JSON_DEPTH + 5, 100_000):
        answer = await exchange(router, post_request(nested(depth)))
        assert answer.status == 400 and "levels deep" in answer.error()["message"]
    assert d.requests == []


async def test_huge_integers_get_400_json(make_upstream: MakeUpstream, make_router: MakeRouter) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d])
    huge = b"1" + b"0" * 5000  # beyond Python's 4300-digit int conversion limit
    for body in (b'{"prompt": "x", "max_tokens": %b}' % huge, b'{"prompt": [%b]}' % huge):
        answer = await exchange(router, post_request(body))
        assert answer.status == 400 and "more than 4300 digits" in answer.error()["message"]
    # a long integer that parses is still no token id
    answer = await exchange(router, post_request(b'{"prompt": [1, %b]}' % (b"9" * 4000)))
    assert answer.status == 400 and answer.error()["param"] == "prompt[1]"
    assert d.requests == []


@pytest.mark.parametrize(
    ("path", "body", "recorded"),
    [
        ("/v1/completions", {"prompt": "\ud800 lone high" * 20}, lambda b: b["prompt"]),
        ("/v1/completions", {"prompt": ["\udfff lone low" * 20, "b"]}, lambda b: b["prompt"][0]),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi \udc80" * 30}]},
            lambda b: b["messages"][0]["content"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user\ud800", "content": [{"type": "text", "text": "\ud83d" * 80}]}]},
            lambda b: b["messages"][0]["content"][0]["text"],
        ),
    ],
)
async def test_unpaired_surrogates_are_routed_and_forwarded_unchanged(
    make_upstream: MakeUpstream,
    make_router: MakeRouter,
    path: str,
    body: dict[str, Any],
    recorded: Callable[[dict[str, Any]], object],
) -> None:
    """The router hashes them (surrogatepass) and leaves judging the text to the engine."""
    p = await make_upstream("prefill", "p0")
    d = await make_upstream("decode", "d0", require_kv_params=True)
    router = await make_router([p], [d])  # prefix-affinity: the prompt is hashed
    raw = json.dumps({"model": MODEL, **body}).encode()  # ensure_ascii: "\ud800" escapes
    for _ in range(2):
        answer = await exchange(router, post_request(raw, path))
        assert answer.status == 200, answer.body
    for upstream in (p, d):
        assert [recorded(r.body) for r in upstream.requests] == [recorded(body)] * 2
    # both requests had an affinity key (one full block of the hashed prefix)
    assert (
        metric_value(router.metrics.render().decode(), 'ucm_router_prefix_affinity_total{result="hit"}') == 2
    )


def test_surrogates_given_as_raw_utf8_bytes_are_accepted_too() -> None:
    # json.loads decodes bytes with surrogatepass: ED A0 80 is U+D800
    parsed = parse_request(b'{"prompt": "\xed\xa0\x80abc"}', "completions", MODEL, 1024)
    assert parsed.prefix_text == b"\xed\xa0\x80abc"
    assert json.loads(build_decode_body(parsed, {"k": 1})) == {
        "prompt": "\ud800abc",
        "kv_transfer_params": {"k": 1},
    }


async def test_malformed_bodies_get_400_json_and_close(
    make_upstream: MakeUpstream, make_router: MakeRouter
) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d])
    cases = [
        post_request(b"not gzip", extra=b"Content-Encoding: gzip\r\n"),
        b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    ]
    for data in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(data)
        answer = await read_answer(reader)
        assert answer.status == 400, answer.body
        assert answer.error()["code"] in ("invalid_body", "bad_http_request")
        assert await closed(reader)
        writer.close()
    assert d.requests == []


async def test_an_internal_error_is_a_json_500(
    make_upstream: MakeUpstream, make_router: MakeRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d])

    async def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(router.proxy, "handle", broken)
    answer = await exchange(router, post_request(b'{"prompt": "x"}'))
    assert answer.status == 500 and answer.error()["code"] == "internal_error"
    assert "a bug" not in answer.body.decode()  # no internals leak to the client


# ---- routes and HTTP ------------------------------------------------------------------------
async def test_unknown_routes_and_methods_get_json(
    make_upstream: MakeUpstream, make_router: MakeRouter
) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d])
    answer = await exchange(router, b"GET /v1/embeddings HTTP/1.1\r\nHost: r\r\n\r\n")
    err = answer.error()
    assert answer.status == 404 and err["code"] == "unknown_url"
    assert "GET /v1/embeddings" in err["message"] and "POST /v1/completions" in err["message"]
    answer = await exchange(router, b"DELETE /v1/completions HTTP/1.1\r\nHost: r\r\n\r\n")
    assert answer.status == 405 and answer.headers["allow"] == "POST"
    assert answer.error()["code"] == "method_not_allowed"
    # aiohttp checks Expect before routing; a value that is not UTF-8 made its check fail (500)
    answer = await exchange(router, post_request(b"{}", extra=b"Expect: something\r\n"))
    assert answer.status == 417 and "something" in answer.error()["message"]
    answer = await exchange(router, b"GET /nowhere HTTP/1.1\r\nHost: r\r\nExpect: \xff\xfe\r\n\r\n")
    assert answer.status == 417 and answer.error()["code"] == "expectation_failed"  # was a 500


@pytest.mark.parametrize(
    "data",
    [
        b"HELLO\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: r\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # TLS to the HTTP port
        b"GET /health HTTP/1.1\r\nHost: r\r\nBad Header\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ],
)
async def test_malformed_http_gets_400_json(
    make_upstream: MakeUpstream, make_router: MakeRouter, data: bytes
) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d])
    answer = await exchange(router, data)
    assert answer.status == 400 and answer.error()["code"] == "bad_http_request"


async def test_too_many_headers_get_431_json(make_upstream: MakeUpstream, make_router: MakeRouter) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], max_headers=20)
    head = b"GET /health HTTP/1.1\r\nHost: r\r\n"
    answer = await exchange(router, head + b"".join(b"X-F%d: v\r\n" % i for i in range(20)) + b"\r\n")
    assert answer.status == 431 and "more than 20 header fields" in answer.error()["message"]
    answer = await exchange(router, head + b"".join(b"X-F%d: v\r\n" % i for i in range(19)) + b"\r\n")
    assert answer.status == 200  # Host and 19 more: exactly the limit


async def test_oversized_header_gets_431_json(make_upstream: MakeUpstream, make_router: MakeRouter) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], max_header_bytes=1024)
    big = b"GET /health HTTP/1.1\r\nHost: r\r\nX-Big: %b\r\n\r\n" % (b"a" * 1100)
    answer = await exchange(router, big)
    assert answer.status == 431 and "longer than 1024 bytes" in answer.error()["message"]
    long_url = b"GET /health?%b HTTP/1.1\r\nHost: r\r\n\r\n" % (b"q" * 1100)
    assert (await exchange(router, long_url)).status == 431
    fits = b"GET /health HTTP/1.1\r\nHost: r\r\nX-Big: %b\r\n\r\n" % (b"a" * 900)
    assert (await exchange(router, fits)).status == 200


# ---- slow clients ---------------------------------------------------------------------------
async def _expect_408(reader: asyncio.StreamReader, started: float, timeout_s: float) -> None:
    answer = await read_answer(reader)
    elapsed = time.monotonic() - started
    assert answer.status == 408 and answer.error()["code"] == "request_timeout"
    assert answer.headers["connection"].lower() == "close"
    assert timeout_s * 0.8 <= elapsed < 10.0  # the configured timeout, with a generous upper bound


async def _expect_408_and_close(reader: asyncio.StreamReader, started: float, timeout_s: float) -> None:
    await _expect_408(reader, started, timeout_s)
    assert await closed(reader)


async def test_slow_client_header_timeout(make_upstream: MakeUpstream, make_router: MakeRouter) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], header_timeout_s=0.5)
    # a partial request line and headers, then silence
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    started = time.monotonic()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Le")
    await _expect_408_and_close(reader, started, 0.5)
    writer.close()
    # a connection that never sends anything
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    await _expect_408_and_close(reader, time.monotonic(), 0.5)
    writer.close()


async def test_trickled_headers_are_bounded_in_total(
    make_upstream: MakeUpstream, make_router: MakeRouter
) -> None:
    """One byte every 50 ms keeps the connection busy but never completes the headers in time:
    the timeout bounds the whole head, not the gap between two reads."""
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], header_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    started = time.monotonic()

    async def trickle() -> None:
        for byte in b"GET /health HTTP/1.1\r\nHost: r\r\nX-Slow: " + b"z" * 200:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        await _expect_408_and_close(reader, started, 0.5)
    finally:
        sender.cancel()
        writer.close()


async def test_idle_kept_alive_connection_outlives_the_header_timeout(
    make_upstream: MakeUpstream, make_router: MakeRouter
) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], header_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    try:
        for _ in range(2):
            writer.write(post_request(b'{"prompt": "x", "max_tokens": 1}'))
            assert (await read_answer(reader)).status == 200
            await asyncio.sleep(0.6)  # idle between requests is the keep-alive timer's business
        # a request split into pieces that arrive in time is served
        writer.write(b"GET /health HTTP/1.1\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"Host: r\r\n\r\n")
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()


async def test_slow_body_gets_408_json(make_upstream: MakeUpstream, make_router: MakeRouter) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], body_timeout_s=0.5, max_concurrent=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
    started = time.monotonic()
    writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n{"prompt":')
    # (the connection then closes after aiohttp's lingering read of the rest, bounded at 10 s)
    await _expect_408(reader, started, 0.5)
    writer.close()
    # the concurrency slot the slow client held is free again
    assert (await exchange(router, post_request(b'{"prompt": "x"}'))).status == 200


# ---- configuration --------------------------------------------------------------------------
def test_connection_limits_come_from_flags() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(
        ["--model", "m", "--header-timeout", "2.5", "--body-timeout", "7", "--max-header-bytes", "4096",
         "--max-headers", "50"]
    )  # fmt: skip
    config = build_config(args)
    assert (config.header_timeout_s, config.body_timeout_s) == (2.5, 7.0)
    assert (config.max_header_bytes, config.max_headers) == (4096, 50)
    defaults = build_config(parser.parse_args(["--model", "m"]))
    assert 10 <= defaults.header_timeout_s <= 30 and defaults.max_headers == RouterConfig("m").max_headers
    for bad in ({"header_timeout_s": 0}, {"body_timeout_s": -1}, {"max_headers": 0}, {"max_header_bytes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RouterConfig("m", **bad)  # type: ignore[arg-type]
