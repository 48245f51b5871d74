"""Client connections: header limits, a header-read timeout, and JSON for every error aiohttp
itself answers.

aiohttp answers some requests before (or without) the router's handlers: malformed HTTP, a too
long request line or header field, too many header fields (all plain-text 400s), unknown routes
and methods (plain-text 404/405), an `Expect` it does not support (417, or a 500 when the header
is not UTF-8), and unhandled handler exceptions (a plain-text 500). `RouterRequestHandler`, the
connection protocol, turns each into the OpenAI error shape (`ucm.router.errors.ApiError`), with
431 for the header limits.

aiohttp has no timeout for reading a request's headers: its keep-alive timer (one hour by
default, meant to outlast the idle timeouts of the load balancers in front) is all that closes a
connection whose client sends a partial request line or headers and then stalls or trickles one
byte at a time. The protocol therefore runs its own timer while it waits for headers: a new
connection must deliver its first request's headers within `header_timeout_s` of connecting, a
kept-alive connection the next request's headers within `header_timeout_s` of that request's
first byte (idle time between requests stays the keep-alive timer's business). On expiry the
client gets a 408 JSON error and the connection closes. One gap is left: the first bytes of a
next request that arrive while the previous one is still being handled (HTTP pipelining, rare in
clients) wait in the parser unseen, so that request is bounded only by the keep-alive timer - as
an idle kept-alive connection is, which any client may hold anyway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from ucm.router.errors import ApiError, shorten

log = logging.getLogger("ucm.router")
_TOO_MANY_HEADERS = "Too many headers"  # the start of aiohttp's message for max_headers
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int  # request line and each header field
    max_headers: int
    header_timeout_s: float

    def protocol_kwargs(self) -> dict[str, Any]:
        """The limits aiohttp's request parser enforces itself."""
        return {
            "max_line_size": self.max_header_bytes,
            "max_field_size": self.max_header_bytes,
            "max_headers": self.max_headers,
        }


class RouterRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1.1 protocol with a header-read timeout and JSON errors (module docstring)."""

    __slots__ = ("_header_timer", "_limits")

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs, **limits.protocol_kwargs())
        self._limits = limits
        self._header_timer: asyncio.TimerHandle | None = None

    # ---- header-read timeout --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()  # the first request's headers are owed from the connect on

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._awaiting_request():
            self._cancel_header_timer()  # the headers are complete: a request (or error) is queued
        elif data and self._header_timer is None:
            self._arm_header_timer()  # these bytes start the next request on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _awaiting_request(self) -> bool:
        """Whether the connection waits for the next request's headers: no request is being
        handled or queued. `_waiter` is the future aiohttp's request loop awaits for the parser's
        next message (its own keep-alive timer tests it the same way)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm_header_timer(self) -> None:
        self._header_timer = asyncio.get_running_loop().call_later(
            self._limits.header_timeout_s, self._header_timed_out
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or not self._awaiting_request():
            return  # the headers arrived meanwhile (not yet seen by data_received), or it closed
        timeout = self._limits.header_timeout_s
        error = ApiError(
            408, f"The request's headers did not arrive within {timeout:g} s.", code="request_timeout"
        )
        # Written directly: no request exists to answer through aiohttp's response machinery.
        log.debug("closing a connection whose client sent no whole request headers in %g s", timeout)
        transport.write(_raw_response(error))
        self.force_close()  # closes once the answer is flushed; ends the request loop

    # ---- JSON errors ----------------------------------------------------------------------
    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # aiohttp's own HTTP errors (404, 405, ...) arrive here as HTTPException responses; this
        # converts them all, including any raised outside the app's middlewares.
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            resp = _http_exception_error(request, resp).response()
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed requests (400 from the parser) and unhandled exceptions (500), as JSON."""
        error = _protocol_error(status, exc, message, self._limits)
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:  # a client's mistake: not worth a traceback in the log per bad request
            log.debug("bad request from %s: %s", request.remote, error.message)
        if request.writer.output_size > 0:  # as aiohttp: the answer already started
            raise ConnectionError("Response is sent already, cannot send another response")
        response = error.response()
        response.force_close()  # the parser lost its place in the stream
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A malformed body (bad chunking or Content-Encoding) fails again when aiohttp drains the
        # rest of it after the router's 400 and is then logged as "Unhandled exception" with a
        # traceback: a client's mistake, already answered, not the router's.
        if isinstance(kw.get("exc_info"), web.RequestPayloadError):
            log.debug("dropped a connection after a malformed request body: %s", kw["exc_info"])
            return
        super().log_exception(*args, **kw)


class RouterHttpServer(web.Server):
    """aiohttp's low-level server, building `RouterRequestHandler` connections."""

    def __init__(
        self, handler: _Handler, *, request_factory: Any, handler_cancellation: bool,
        limits: ConnectionLimits, **protocol_kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(
            handler, request_factory=request_factory, handler_cancellation=handler_cancellation,
            **protocol_kwargs,
        )  # fmt: skip
        self._limits = limits
        self._protocol_kwargs = protocol_kwargs

    def __call__(self) -> web.RequestHandler:
        loop = asyncio.get_running_loop()
        return RouterRequestHandler(self, loop=loop, limits=self._limits, **self._protocol_kwargs)


class RouterAppRunner(web.AppRunner):
    """`web.AppRunner` whose server builds `RouterRequestHandler` connections: the app's handler
    and request factory, as aiohttp's own server for the app gets them, under the router's
    protocol. `protocol_kwargs` are RequestHandler options (access_log, keepalive_timeout...)."""

    def __init__(
        self, app: web.Application, *, limits: ConnectionLimits, handler_cancellation: bool = False,
        shutdown_timeout: float = 60.0, **protocol_kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(
            app, handler_cancellation=handler_cancellation, shutdown_timeout=shutdown_timeout,
            **protocol_kwargs,
        )  # fmt: skip
        self._limits = limits
        self._handler_cancellation = handler_cancellation
        self._protocol_kwargs = protocol_kwargs

    async def _make_server(self) -> web.Server:
        app_server = await super()._make_server()  # starts and freezes the app
        return RouterHttpServer(
            _check_expect(app_server.request_handler),
            request_factory=app_server.request_factory,
            handler_cancellation=self._handler_cancellation,
            limits=self._limits,
            **self._protocol_kwargs,
        )


def _check_expect(handler: _Handler) -> _Handler:
    """Answers an `Expect` other than 100-continue with a JSON 417 before the app sees it: aiohttp
    checks it ahead of routing and middlewares, with an error whose text fails to encode when
    the header holds bytes that are not UTF-8 (an internal error, 500, instead of the client's)."""

    async def checked(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect is not None and request.version == HttpVersion11 and expect.lower() != "100-continue":
            return ApiError(
                417,
                f"Unsupported Expect header {shorten(expect)}: the router supports only 100-continue.",
                code="expectation_failed",
            ).response()
        return await handler(request)

    return checked


def _protocol_error(
    status: int, exc: BaseException | None, message: str | None, limits: ConnectionLimits
) -> ApiError:
    if isinstance(exc, LineTooLong):
        return ApiError(
            431,
            f"The request line or a header field is longer than {limits.max_header_bytes} bytes.",
            code="request_header_fields_too_large",
        )
    if isinstance(exc, BadHttpMessage) and exc.message.startswith(_TOO_MANY_HEADERS):
        return ApiError(
            431,
            f"The request has more than {limits.max_headers} header fields.",
            code="request_header_fields_too_large",
        )
    if status >= 500:
        return ApiError(
            status,
            "The router failed to handle the request (an internal error, logged by the router).",
            type="server_error",
            code="internal_error",
        )
    detail = f": {parse_error_text(exc)}" if exc is not None else f": {message}" if message else ""
    return ApiError(status, f"Malformed HTTP request{detail}", code="bad_http_request")


def parse_error_text(exc: BaseException) -> str:
    """aiohttp's explanation of a parse error on one line (its messages span several, and a
    payload error wraps the parser's error as "400, message: ...")."""
    cause = exc if isinstance(exc, HttpProcessingError) else exc.__cause__
    text = cause.message if isinstance(cause, HttpProcessingError) and cause.message else str(exc)
    return " ".join(text.split())


def _http_exception_error(request: web.BaseRequest, exc: web.HTTPException) -> ApiError:
    """An aiohttp HTTP error (raised by its router or checks) in the OpenAI error shape."""
    target = f"{request.method} {_shorten_path(request.path)}"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    if exc.status == HTTPStatus.NOT_FOUND:
        return ApiError(404, f"Invalid URL ({target}): {_known_routes(request)}", code="unknown_url")
    if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
        allowed = headers.get("Allow", "")
        message = f"Method not allowed ({target}); this path accepts {allowed or 'no method'}."
        return ApiError(405, message, code="method_not_allowed", headers=headers)
    text = exc.text or ""
    detail = exc.reason if not text or text.startswith(f"{exc.status}:") else text  # not the default text
    return ApiError(exc.status, f"{detail} ({target}).", code=_snake(exc.reason), headers=headers)


def _known_routes(request: web.BaseRequest) -> str:
    if not isinstance(request, web.Request):
        return "no such route."
    routes = sorted(
        {
            f"{r.method} {r.resource.canonical}"
            for r in request.app.router.routes()
            if r.resource and r.method != "HEAD"
        },
        key=lambda route: route.split(" ", 1)[::-1],
    )
    return "the router serves " + ", ".join(routes) + "."


def _shorten_path(path: str, limit: int = 100) -> str:
    return path if len(path) <= limit else path[:limit] + "..."


def _snake(reason: str) -> str:
    return reason.lower().replace(" ", "_").replace("-", "_")


def _raw_response(error: ApiError) -> bytes:
    """A whole HTTP/1.1 answer carrying `error`, closing the connection."""
    body = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
