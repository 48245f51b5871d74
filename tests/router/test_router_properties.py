"""Property-based tests: whatever a client sends, the router either serves the request or answers
a 4xx OpenAI-style JSON error - never a 5xx, a plain-text error, a dropped connection or a hang.

Two levels: the request parser (`parse_request` and the prefill/decode bodies built from its
result) on arbitrary JSON values and bytes, and the whole HTTP server (a real router on a
loopback port, in front of the fake vLLM upstreams of `ucm.bench.fake_upstreams`) on arbitrary bodies,
methods, paths and header values sent over a raw socket (no client library cleans them up).
The Hypothesis profile (`tests/conftest.py`) sets the number of examples.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from ucm.bench.fake_upstreams import FakeUpstream
from ucm.router.affinity import PrefixKeyer
from ucm.router.config import RouterConfig
from ucm.router.errors import ApiError
from ucm.router.health import StaticDiscovery
from ucm.router.openai_request import build_decode_body, build_prefill_body, parse_request
from ucm.router.server import RouterServer

MODEL = "fake-model"
KEYER = PrefixKeyer(MODEL, 2)  # small: short prompts fill a block
KINDS = st.sampled_from(["completions", "chat"])

# ---- JSON values ----------------------------------------------------------------------------
# Text includes unpaired surrogates, which JSON's \u escapes can carry.
TEXT = st.text(st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=24)
FIELDS = [
    "model", "prompt", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "min_tokens", "min_completion_tokens", "kv_transfer_params", "role", "content", "type", "text",
    "image_url", "url", "include_usage", "temperature",
]  # fmt: skip
KEYS = st.sampled_from(FIELDS) | TEXT
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=16,
)
TOKEN = st.integers(0, 2**31 - 1)
ANY_TOKEN = st.one_of(TOKEN, TOKEN, st.integers(-5, 2**40))
PROMPT = st.one_of(
    TEXT,
    st.lists(TEXT, min_size=1, max_size=3),
    st.lists(TOKEN, min_size=1, max_size=40),
    st.lists(st.lists(TOKEN, max_size=20), min_size=1, max_size=3),
)
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"])},
    optional={"text": TEXT, "image_url": st.fixed_dictionaries({"url": TEXT})},
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]) | TEXT},
    optional={"content": st.one_of(TEXT, st.none(), st.lists(PART, max_size=3))},
)
COMMON = {
    "model": st.just(MODEL),
    "stream": st.booleans() | st.none(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}) | st.none(),
    "max_tokens": st.integers(0, 8) | st.none(),
    "temperature": st.floats(0, 2),
    "n": st.just(1),
}
# Valid requests (the prompt and texts still hold any character, unpaired surrogates included)...
COMPLETION = st.fixed_dictionaries({"prompt": PROMPT}, optional=COMMON)
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={**COMMON, "max_completion_tokens": st.integers(0, 8)},
)
# ...with up to two members added or replaced by any JSON value (often none: a valid request).
CHANGES = st.lists(st.tuples(KEYS, JSON | st.lists(ANY_TOKEN, max_size=5)), max_size=2)


def changed(base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(base, CHANGES).map(lambda bc: {**bc[0], **dict(bc[1])})


REQUESTS = st.one_of(
    changed(COMPLETION).map(lambda body: ("completions", body)),
    changed(CHAT).map(lambda body: ("chat", body)),
)
BODY_VALUES = st.one_of(JSON, REQUESTS.map(lambda kb: kb[1]))


def encode(value: object, ascii_only: bool) -> bytes:
    """JSON bytes as clients write them: ASCII with \\u escapes, or UTF-8 (surrogates, which UTF-8
    cannot hold, as the bytes Python's json.loads decodes back to them)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# ---- raw JSON text: what json.dumps cannot write ----------------------------------------------
RAW_SCALARS = (
    st.sampled_from(
        [b"null", b"true", b"1e999", b"-1e999", b"NaN", b"-0", b"1.5e-400", b'"\\ud800"', b'"\\u0000"']
    )
    | st.integers(1, 6000).map(lambda n: b"7" * n)  # up to and past Python's 4300-digit int limit
    | st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n)  # past the router's and the stack's depth
    | SCALARS.map(lambda v: json.dumps(v).encode())
)
RAW_VALUES = st.recursive(
    RAW_SCALARS,
    lambda children: (
        st.lists(children, max_size=3).map(lambda xs: b"[" + b",".join(xs) + b"]")
        | st.lists(st.tuples(KEYS.map(lambda k: json.dumps(k).encode()), children), max_size=3).map(
            lambda kvs: b"{" + b",".join(k + b":" + v for k, v in kvs) + b"}"
        )
    ),
    max_leaves=6,
)
RAW_REQUEST = st.tuples(st.sampled_from(["prompt", "messages", "max_tokens", "extra"]), RAW_VALUES).map(
    lambda kv: b'{"model": "fake-model", "%b": %b}' % (kv[0].encode(), kv[1])
)
# Near-JSON: a soup of JSON tokens, mostly invalid, sometimes valid.
SOUP = st.lists(
    st.sampled_from(
        [b"{", b"}", b"[", b"]", b",", b":", b'"prompt"', b'"x"', b"1", b"null", b" ", b'"\\', b"\xff"]
    ),
    max_size=40,
).map(b"".join)
BODY_BYTES = (
    st.tuples(BODY_VALUES, st.booleans()).map(lambda vb: encode(*vb))
    | RAW_REQUEST
    | RAW_VALUES
    | SOUP
    | st.binary(max_size=200)
)


def assert_openai_error(error: ApiError) -> None:
    assert 400 <= error.status < 500, (error.status, error.message)
    body = json.loads(json.dumps(error.body()))  # serialisable as the client receives it
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


# ---- the parser -----------------------------------------------------------------------------
def check_parse(raw: bytes, kind: Any) -> None:
    """parse_request either refuses with a 4xx naming what was wrong, or its result builds valid
    prefill and decode bodies and an affinity key."""
    try:
        parsed = parse_request(raw, kind, MODEL, KEYER.text_limit)
    except ApiError as error:
        assert_openai_error(error)
        return
    assert isinstance(parsed.body, dict) and "kv_transfer_params" not in parsed.body
    KEYER.key(parsed.prefix_text, parsed.prefix_tokens)  # must not raise
    prefill = json.loads(json.dumps(build_prefill_body(parsed)))
    assert prefill["max_tokens"] == 1 and prefill["stream"] is False
    params = {"remote_engine_id": "p0", "do_remote_prefill": True}
    decode = json.loads(build_decode_body(parsed, params))
    expected = {**parsed.body, "kv_transfer_params": params}
    assert json.dumps(decode, sort_keys=True) == json.dumps(expected, sort_keys=True)  # (NaN-safe)
    assert build_decode_body(parsed, None) == raw


@given(value=BODY_VALUES, ascii_only=st.booleans(), kind=KINDS)
def test_parser_on_json_values(value: object, ascii_only: bool, kind: Any) -> None:
    check_parse(encode(value, ascii_only), kind)


@given(raw=BODY_BYTES, kind=KINDS)
def test_parser_on_arbitrary_bytes(raw: bytes, kind: Any) -> None:
    check_parse(raw, kind)


# ---- the HTTP server ------------------------------------------------------------------------
class ThreadedRouter:
    """A router with one prefill and one decode fake upstream, on an event loop in a thread, so
    that synchronous Hypothesis tests can talk to it over real sockets."""

    def __init__(self, **overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="router", daemon=True)
        self.overrides = overrides
        self.upstreams: list[FakeUpstream] = []
        self.router: RouterServer | None = None
        self.port = 0

    def __enter__(self) -> ThreadedRouter:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        self.upstreams = [
            FakeUpstream("prefill", "p0", model=MODEL, record=False),
            FakeUpstream("decode", "d0", model=MODEL, record=False),
        ]
        for upstream in self.upstreams:
            await upstream.start()
        config = RouterConfig(model=MODEL, host="127.0.0.1", port=0, probe_interval_s=0, **self.overrides)
        discovery = StaticDiscovery([self.upstreams[0].url], [self.upstreams[1].url])
        self.router = RouterServer(config, discovery)
        await self.router.start()
        self.port = self.router.port

    async def _stop(self) -> None:
        if self.router is not None:
            await self.router.shutdown()
        for upstream in self.upstreams:
            await upstream.close()


@pytest.fixture(scope="module")
def threaded_router() -> Iterator[ThreadedRouter]:
    # small limits, so that generated requests reach them
    with ThreadedRouter(max_body_bytes=16384, max_headers=24, max_header_bytes=512) as router:
        yield router


def send(port: int, data: bytes, method: str) -> http.client.HTTPResponse:
    """Writes `data` on a fresh connection and reads the whole answer (http.client only parses
    it: it skips a 100 Continue and undoes chunked framing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)  # a hang fails, not a timing
    try:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        response.body = response.read()  # type: ignore[attr-defined]
        return response
    finally:
        sock.close()


def assert_served_or_refused(response: http.client.HTTPResponse, method: str = "POST") -> None:
    body: bytes = response.body  # type: ignore[attr-defined]
    ctype = response.getheader("Content-Type", "")
    event(f"HTTP {response.status}")  # the distribution shows with --hypothesis-show-statistics
    if method == "HEAD":  # the same status and headers as GET, without the body
        assert response.status < 300 or (response.status < 500 and ctype.startswith("application/json"))
        return
    if 200 <= response.status < 300:
        if ctype.startswith("text/event-stream"):
            assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
            assert b'"error"' not in body, body  # no mid-stream failure
        elif ctype.startswith("application/json"):
            json.loads(body)
        return
    assert 400 <= response.status < 500, (response.status, body[:500])
    assert ctype.startswith("application/json"), (response.status, ctype, body[:200])
    error = json.loads(body)["error"]
    event(f"HTTP {response.status} {error.get('code')}")
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HEADER_NAMES = (
    st.sampled_from([
        "X-Request-Id", "Authorization", "Accept", "Accept-Encoding", "User-Agent", "Content-Type",
        "Expect", "Cookie", "X-Forwarded-For", "Connection", "Upgrade", "Content-Encoding", "TE",
        "Trailer", "Keep-Alive", "Range", "If-None-Match", "Origin", "Forwarded",
    ])
    | st.text(st.sampled_from(TOKEN_CHARS), min_size=1, max_size=20)
).filter(lambda name: name.lower() not in ("host", "content-length", "transfer-encoding"))  # fmt: skip
# Field values as RFC 9110 allows them (visible ASCII, space, tab, obs-text bytes 0x80-0xFF),
# long ones, and any byte but CR and LF (which would end the field: the framing is the test's).
VALID_VALUE_CHARS = st.characters(
    min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"
) | st.just("\t")
HEADER_VALUES = st.one_of(
    st.text(VALID_VALUE_CHARS, max_size=40),
    st.text(VALID_VALUE_CHARS, max_size=40),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=100, max_size=600),
    st.text(st.characters(max_codepoint=0xFF, exclude_characters="\r\n"), max_size=40),
)
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)
METHODS = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "BREW"])
PATHS = st.sampled_from(
    ["/v1/completions"] * 4 + ["/v1/chat/completions"] * 4 + ["/v1/models", "/health", "/ready", "/metrics"]
) | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(lambda p: "/" + p)


def http_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes, chunked: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: router", *(f"{name}: {value}" for name, value in headers)]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"".join(
            b"%x\r\n%b\r\n" % (len(body[i : i + 64]), body[i : i + 64]) for i in range(0, len(body), 64)
        )
        payload = framed + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


@given(method=METHODS, path=PATHS, headers=HEADERS, body=BODY_BYTES, chunked=st.booleans())
def test_http_server_serves_or_refuses_with_json(
    threaded_router: ThreadedRouter, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
    chunked: bool,
) -> None:  # fmt: skip
    data = http_request(method, path, headers, body, chunked)
    response = send(threaded_router.port, data, method)
    assert_served_or_refused(response, method)


@given(request=REQUESTS, ascii_only=st.booleans(), headers=HEADERS)
def test_http_server_on_request_shaped_bodies(
    threaded_router: ThreadedRouter, request: tuple[str, dict[str, Any]], ascii_only: bool,
    headers: list[tuple[str, str]],
) -> None:  # fmt: skip
    """Mostly valid requests, so that many examples reach the upstreams and come back."""
    kind, value = request
    path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    data = http_request("POST", path, headers, encode(value, ascii_only), chunked=False)
    assert_served_or_refused(send(threaded_router.port, data, "POST"))
