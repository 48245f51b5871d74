"""The router's HTTP/1.1 client for its upstreams: pooled keep-alive connections on an
`asyncio.Protocol`, responses parsed by `httptools` (llhttp, the parser uvicorn - and so vLLM's
own server - uses).

Why not aiohttp's client: per PD request the router makes two upstream calls and relays a
stream, and aiohttp's client machinery (request/response objects, its stream reader, timers,
tracing hooks) was about a third of the router's CPU per request. Here a call is one write of
pre-formatted bytes and a parser feeding a response object; a streamed body is handed on as the
bytes that arrived (every chunk buffered since the last read, joined), never re-framed.

Semantics the proxy relies on:
* `request()` returns once the status line and headers arrived (`headers_timeout`); connecting
  is bounded by `connect_timeout` and a connect failure raises `UpstreamConnectError` (nothing
  was sent, so a retry elsewhere is safe); timeouts raise `TimeoutError`;
* `read_chunk(timeout)` waits at most `timeout` between two arrivals (an idle timeout) and
  returns b"" at the end of the body; a connection lost or an unparsable answer before the end
  raises `UpstreamError`;
* `relay(sink, timeout, drain)` hands the rest of the body to `sink` as it arrives, from the
  connection's data callback, and returns at its end (same idle timeout and errors). Pulling a
  piece costs a future, a timer and a task switch - and on uvloop one more event-loop pass with
  its own epoll_wait - which for a stream of small token events was a large part of relaying
  one; pushed, a piece costs its socket read and write;
* `close()` puts a fully read connection back in the pool (when the upstream allows keep-alive)
  and aborts any other - so a cancelled relay (client gone) drops the upstream connection, which
  is how vLLM learns to abort the request;
* idle connections are reused for at most `keepalive_s` (default 4 s), shorter than uvicorn's
  5 s keep-alive: reusing a connection the server is closing would fail a POST nothing retries.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

_PAUSE_BYTES = 256 * 1024  # stop reading from the upstream while this much waits to be relayed


class UpstreamError(Exception):
    """The upstream connection failed or broke off, or its answer was not HTTP."""


class UpstreamConnectError(UpstreamError):
    """Connecting failed: nothing was sent."""


class _Origin:
    """Where an endpoint URL points (parsed once per URL)."""

    __slots__ = ("host", "host_header", "key", "port", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port], got {url!r}")
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.key = url


class UpstreamResponse:
    """Status, headers and the body of one upstream answer, as they arrive."""

    __slots__ = (
        "_chunks", "_conn", "_error", "_hold", "_idle_timeout", "_idle_timer", "_last_arrival",
        "_sink", "_sink_full", "_size", "_timed_out", "_waiter", "complete", "headers", "status",
    )  # fmt: skip

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-case names
        self.complete = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._hold = True  # pause reading while much is buffered (off once read() wants it all)
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None  # set while relay() runs
        self._sink_full = False  # the sink asked to wait (reading is paused until it drained)
        self._idle_timeout = 0.0
        self._last_arrival = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._timed_out = False

    @property
    def content_type(self) -> str:
        """The media type without parameters (as aiohttp's `content_type`)."""
        return self.headers.get("content-type", "application/octet-stream").split(";", 1)[0].strip()

    async def read_chunk(self, timeout: float) -> bytes:
        """Every body byte that arrived since the last call (waiting at most `timeout` for one);
        b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            await self._wait(timeout)
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._conn.resume()
        return data

    async def read(self, timeout: float) -> bytes:
        """The whole body (`timeout`: the longest wait between two arrivals)."""
        self._hold = False
        self._conn.resume()
        while not self.complete:
            if self._error is not None:
                raise self._error
            await self._wait(timeout)
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    async def relay(
        self, sink: Callable[[bytes], bool], timeout: float, drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Hands every body byte not read yet to `sink` as it arrives - called from the
        connection's data callback, so no task wakes per piece - and returns at the end of the
        body. `sink` returns False when its consumer is full: reading from the upstream pauses
        until `drain()` returns. `timeout` is the longest wait between two arrivals (time spent
        waiting for `drain` does not count); raises TimeoutError past it, and `UpstreamError`
        when the connection breaks before the end."""
        loop = self._conn.loop
        self._sink, self._idle_timeout, self._timed_out = sink, timeout, False
        self._last_arrival = loop.time()
        # one timer per relay, re-armed only when it fires early (not one per arrival)
        self._idle_timer = loop.call_at(self._last_arrival + timeout, self._check_idle)
        try:
            self._flush_to_sink()
            while True:
                if self._sink_full:  # (what arrived meanwhile waits in _chunks, reading paused)
                    await drain()
                    self._last_arrival = loop.time()
                    self._sink_full = False
                    self._flush_to_sink()
                    if not self._sink_full:
                        self._conn.resume()
                    continue
                if self.complete:
                    return
                if self._error is not None:
                    raise self._error
                if self._timed_out:
                    raise TimeoutError()
                waiter = self._waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
        finally:
            self._sink = None
            self._idle_timer.cancel()

    def _flush_to_sink(self) -> None:
        """What arrived while nothing (or a full sink) took it, to the sink."""
        if self._chunks and self._sink is not None:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            if not self._sink(data):
                self._sink_full = True
                self._conn.pause()

    def _check_idle(self) -> None:
        loop = self._conn.loop
        now = loop.time()
        if self._sink_full:  # waiting for the sink's consumer, not for the upstream
            self._last_arrival = now
        deadline = self._last_arrival + self._idle_timeout
        if now < deadline:
            self._idle_timer = loop.call_at(deadline, self._check_idle)
            return
        self._timed_out = True
        self._wake()

    def close(self) -> None:
        """Back to the pool when the answer was read to its end, else the connection is dropped."""
        self._conn.finish(self)

    async def _wait(self, timeout: float) -> None:
        loop = self._conn.loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- fed by the connection's parser -------------------------------------------------
    def _feed(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None and not self._sink_full:
            self._last_arrival = self._conn.loop.time()
            if not sink(data):
                self._sink_full = True
                self._conn.pause()
                self._wake()
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._hold and self._size > _PAUSE_BYTES:
            self._conn.pause()
        self._wake()

    def _fail(self, error: Exception) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._wake()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time (no pipelining)."""

    def __init__(self, pool: UpstreamPool, origin: _Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.keep_alive = False
        self.paused = False
        self.idle_since = 0.0
        self._headers_waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing was asked: the connection is out of step
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(UpstreamError(f"{self.origin.key} sent an unparsable answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is None or response.complete:
            return
        if response.status and self._ends_at_close(response):  # a body delimited by the close
            self.on_message_complete()
            return
        self._broken(UpstreamError(f"{self.origin.key} closed the connection mid-answer"))

    # ---- httptools callbacks ------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.status = self.parser.get_status_code()
        # asked here: llhttp forgets the message's keep-alive flags once the message is complete
        self.keep_alive = self.parser.should_keep_alive()
        _wake(self._headers_waiter)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        response.complete = True
        response._wake()

    # ---- used by the pool and the response ------------------------------------------------
    async def send(self, data: bytes, headers_timeout: float) -> UpstreamResponse:
        assert self.transport is not None
        response = self.response = UpstreamResponse(self)
        self.transport.write(data)
        if not response.status:
            waiter = self._headers_waiter = self.loop.create_future()
            timer = self.loop.call_later(headers_timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._headers_waiter = None
            if response._error is not None and not response.status:
                raise response._error
        return response

    def finish(self, response: UpstreamResponse) -> None:
        if self.response is not response:
            return
        self.response = None
        if response.complete and not self.closed and self.keep_alive:
            self.pool.release(self)
        else:
            self.pool.forget(self)
            self.abort()

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _broken(self, error: UpstreamError) -> None:
        response = self.response
        if response is not None:
            response._fail(error)
        if self._headers_waiter is not None and not self._headers_waiter.done():
            self._headers_waiter.set_exception(error)
        self.abort()

    def _ends_at_close(self, response: UpstreamResponse) -> bool:
        headers = response.headers
        return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class UpstreamPool:
    """Keep-alive connections per upstream URL; no limit (the router bounds its concurrency)."""

    def __init__(self, keepalive_s: float = 4.0) -> None:
        self.keepalive_s = keepalive_s
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[str, collections.deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self.opened = 0  # connections made so far (reuse shows as requests >> opened)

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        connect_timeout: float,
        headers_timeout: float,
    ) -> UpstreamResponse:
        """Sends one request and returns when its status and headers arrived. The caller must
        `close()` the response (in a `finally`)."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = _Origin(base_url)
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        if body or method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        lines.append("\r\n")
        data = "".join(lines).encode("utf-8", "surrogateescape") + body
        conn = self._reuse(origin) or await self._connect(origin, connect_timeout)
        self._busy.add(conn)
        try:
            return await conn.send(data, headers_timeout)
        except BaseException:
            self._busy.discard(conn)
            conn.abort()
            raise

    def release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        now = time.monotonic()
        conn.idle_since = now
        idle = self._idle.setdefault(conn.origin.key, collections.deque())
        # the oldest idle connections sit at the left: drop those past their keep-alive
        while idle and (idle[0].closed or now - idle[0].idle_since > self.keepalive_s):
            idle.popleft().abort()
        idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)

    def _reuse(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closing
            if not conn.closed and now - conn.idle_since <= self.keepalive_s:
                return conn
            conn.abort()
        return None

    async def _connect(self, origin: _Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.ssl:
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin, loop), origin.host, origin.port, ssl=context
                )
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {origin.key}: {exc}") from exc
        self.opened += 1
        return conn

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        for conn in list(self._busy):
            conn.abort()
        self._busy.clear()
