"""The HTTP/1.1 server under the router's fake upstreams (`ucm.bench.fake_upstreams`): an
`asyncio.Protocol` with `httptools`' request parser, keep-alive, one request at a time per
connection.

Why not aiohttp's server: in `ucm bench router` the upstreams and the load generator share one
CPU, and with aiohttp the upstreams' CPU per PD request exceeded the router's own, so the bench
measured the test peers, not the router. The peers are test doubles, so they may be lean; what
the router sees on the wire stays what a vLLM server sends (status, headers, chunked SSE).

A handler gets an `Exchange` (the request plus ways to answer it). Each write goes to the socket
at once - a stream's events leave one write each, as from uvicorn (coalescing them measured ~15%
cheaper for router and toy proxy alike, but it is not what a vLLM server does). A client that
goes away cancels its handler (as aiohttp's `handler_cancellation` did).
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from multidict import CIMultiDict

log = logging.getLogger("ucm.bench.fake_upstreams")


class Exchange:
    """One request and its answer."""

    def __init__(
        self, conn: _ServerConnection, method: str, path: str, headers: CIMultiDict[str], body: bytes
    ) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.started = False  # status line sent
        self.finished = False  # whole answer sent (or the connection dropped)
        self._chunked = False

    def json(self) -> Any:
        return json.loads(self.body)

    def respond(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        """The whole answer at once (Content-Length framing)."""
        self._head(status, content_type, f"Content-Length: {len(body)}")
        self._conn.write(body)
        self._done()

    def respond_json(self, obj: Any, status: int = 200) -> None:
        self.respond(status, json.dumps(obj).encode())

    def start_stream(self, content_type: str) -> None:
        self._head(200, content_type, "Transfer-Encoding: chunked")
        self._chunked = True

    def send(self, data: bytes) -> None:
        """One chunk of a streamed body."""
        if data:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self._conn.write(b"0\r\n\r\n")
        self._done()

    def abort(self) -> None:
        """Drops the connection right after what was written so far (a crashing server)."""
        self.finished = True
        self._conn.abort()

    def _head(self, status: int, content_type: str, framing: str) -> None:
        self.started = True
        close = "" if self._conn.keep_alive else "Connection: close\r\n"
        self._conn.write(
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
            f"{framing}\r\n{close}\r\n".encode()
        )

    def _done(self) -> None:
        self.finished = True


Handler = Callable[[Exchange], Awaitable[None]]


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.keep_alive = True
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.pending: collections.deque[Exchange] = collections.deque()
        self._url = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body: list[bytes] = []
        self._request_keep_alive = True

    # ---- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # ---- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = CIMultiDict()
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._request_keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = self._url.decode("latin-1").split("?", 1)[0]
        method = self.parser.get_method().decode("latin-1")
        exchange = Exchange(self, method, path, self._headers, b"".join(self._body))
        self.keep_alive = self._request_keep_alive
        self.pending.append(exchange)
        if self.task is None:
            self._next()

    # ---- answering ------------------------------------------------------------------------
    def _next(self) -> None:
        self.task = self.loop.create_task(self._serve(self.pending.popleft())) if self.pending else None

    async def _serve(self, exchange: Exchange) -> None:
        try:
            await self.server.handler(exchange)
            if not exchange.started:
                exchange.respond(500, b"the handler did not answer", "text/plain")
        except Exception:
            log.exception("test upstream handler failed")
            if not exchange.started:
                exchange.respond(500, b"handler error", "text/plain")
            else:
                exchange.abort()
        if self.closed:
            return
        if exchange.finished and self.keep_alive:
            self._next()
        else:
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listens; returns the port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), host, port, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stops listening and drops every connection (cancelling their handlers)."""
        if self._server is None:
            return
        self._server.close()
        tasks = [c.task for c in self.connections if c.task is not None and not c.task.done()]
        for conn in list(self.connections):
            conn.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
