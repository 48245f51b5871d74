"""The prefill -> decode flow of one request over pooled keep-alive upstream connections.

Timeouts (per upstream request): connect (`connect_timeout_s`); first byte = response headers
(`first_byte_timeout_s` for prefill and streaming decode, `request_timeout_s` for non-streaming
decode, whose headers come only after the whole generation); idle = longest gap between two
reads of a streaming body (`idle_timeout_s`).

Failure handling:
* prefill 4xx: the client's mistake (e.g. prompt too long) - passed through unchanged;
* prefill failure (connect error, timeout, 5xx, unreadable answer): the endpoint's failure is
  counted and, with `fallback=decode-only`, the request goes to decode alone (counted);
* decode connect error (nothing was sent): one retry on another decode endpoint of the same
  revision;
* decode failure after the SSE stream started: the stream ends with an OpenAI-style error event
  `data: {"error": {...}}` then `data: [DONE]`, the way vLLM ends a stream that fails. Only whole
  SSE events are forwarded, so the error event never lands inside a half-written one. A failure
  after the upstream's `data: [DONE]` (only its end of body missing) costs the client nothing: it
  has the whole answer, so it gets no error event (the endpoint's failure is still counted);
* client disconnect: the handler is cancelled (aiohttp `handler_cancellation`), which closes the
  upstream connections, and vLLM aborts the request when its client goes away.

Hot path (the router's CPU per request is what bounds its throughput): upstream calls go through
`ucm.router.upstream` (pooled keep-alive connections, httptools' parser); the decode stream's bytes
are relayed as read - only cut at SSE event boundaries, never parsed; the decode body is the
client's bytes with the hand-off params spliced in (no re-serialisation); the response headers
leave with the first event and the `[DONE]` event with the end of the chunked body, so a stream
costs the client side as few writes (and wake-ups) as its events allow. After the first event the
relay runs in the upstream connection's data callback (`UpstreamResponse.relay`): a token event
costs its socket read and write, not a task switch (paced streams: 1.46-1.54 -> ~1.2 ms of router
CPU per 16-token stream).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ucm.router.affinity import PrefixKeyer
from ucm.router.config import RouterConfig
from ucm.router.endpoints import EndpointState, Registry
from ucm.router.errors import bad_gateway, build_error_body, gateway_timeout, unavailable
from ucm.router.metrics import RouterMetrics
from ucm.router.openai_request import ParsedRequest, build_decode_body, build_prefill_body
from ucm.router.upstream import UpstreamConnectError, UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("ucm.router")
_EVENT_END = b"\n\n"
_DONE_EVENT = b"data: [DONE]\n\n"
_MAX_PENDING = 1 << 20  # an event larger than this is forwarded in pieces
_KEEPALIVE_S = 4.0


class _UpstreamFailed(Exception):
    """The upstream could not serve (counted against the endpoint)."""

    def __init__(self, message: str, *, timeout: bool = False, connect: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.connect = connect


class _Passthrough(Exception):
    """An upstream 4xx answer the client gets unchanged."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.response = web.Response(status=status, body=body, content_type=content_type)


class _EventStreamResponse(web.StreamResponse):
    """Sends its status line and headers with the first body write (as `web.Response` does for
    whole bodies) instead of alone on `prepare()`: one send and one client wake-up fewer per
    stream. The client sees nothing until the first event, which is all an SSE client waits for.
    Should aiohttp drop this (private) switch, headers simply leave on prepare() again."""

    _send_headers_immediately = False  # aiohttp's switch, read by StreamResponse._write_headers


def sse_error_event(message: str, code: int = 502) -> bytes:
    """The terminating error event of a broken stream, then the [DONE] sentinel."""
    body = build_error_body(message, type="upstream_error", code=code)
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


class PDProxy:
    def __init__(self, config: RouterConfig, registry: Registry, metrics: RouterMetrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.keyer = PrefixKeyer(config.model, config.affinity_prefix_blocks)
        self._pool: UpstreamPool | None = None

    @property
    def pool(self) -> UpstreamPool:
        if self._pool is None:
            raise RuntimeError("PDProxy.start() was not awaited")
        return self._pool

    async def start(self) -> None:
        # No connection limit: the router bounds concurrency itself (max_concurrent), so no
        # request waits behind the pool. Idle keep-alive connections are dropped after 4 s,
        # before vLLM's server drops them (uvicorn's keep-alive timeout, 5 s by default):
        # reusing a connection the upstream is closing fails the request, and for a POST nothing
        # retries it.
        self._pool = UpstreamPool(keepalive_s=_KEEPALIVE_S)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # ---- the flow -------------------------------------------------------------------------
    async def handle(self, request: web.Request, parsed: ParsedRequest) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or secrets.token_hex(16)
        # identity: the router relays bodies as they come (auto_decompress off) and does not pass
        # a Content-Encoding on, so an upstream must not compress
        headers = {
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
            "Accept-Encoding": "identity",
        }
        auth = request.headers.get("Authorization")
        if auth:
            headers["Authorization"] = auth
        key = None
        if self.config.policy == "prefix-affinity":
            key = self.keyer.key(parsed.prefix_text, parsed.prefix_tokens)
        route = self.registry.choose_route(key)
        kv_params: dict[str, Any] | None = None
        revision: str | None = None
        fallback: str | None = None
        if route is None:
            fallback = self._allow_fallback(
                "no_pair", "no revision has both an available prefill and decode endpoint"
            )
        else:
            revision = route.revision
            self.metrics.child(self.metrics.affinity, route.affinity).inc()
            try:
                kv_params = await self._prefill(route.prefill, parsed, headers)
            except _Passthrough as answer:
                return answer.response
            except _UpstreamFailed as exc:
                fallback = self._allow_fallback("prefill_failed", f"prefill failed: {exc}", exc.timeout)
        decode = self.registry.choose_decode(revision)
        if decode is None and revision is not None:
            # The revision lost its decode endpoints during prefill; never mix revisions: the
            # request may only go decode-only elsewhere (without the prefill's hand-off params).
            fallback = self._allow_fallback("no_decode_in_revision", f"revision {revision!r} has no decode")
            kv_params, decode = None, self.registry.choose_decode(None)
        if decode is None:
            raise unavailable("no decode endpoint is available")
        if fallback is not None:
            self.metrics.child(self.metrics.fallbacks, fallback).inc()
        else:
            self.metrics.pd_requests.inc()
        body = build_decode_body(parsed, kv_params)
        try:
            return await self._decode(request, decode, parsed, body, headers)
        except _UpstreamFailed as exc:  # connect error: nothing was sent, so one retry is safe
            retry = self.registry.choose_decode(decode.endpoint.revision, exclude=decode)
            if retry is None:
                raise bad_gateway(f"decode unreachable: {exc}") from exc
            log.warning(
                "decode %s unreachable (%s); retrying on %s", decode.endpoint.url, exc, retry.endpoint.url
            )
        try:
            return await self._decode(request, retry, parsed, body, headers)
        except _UpstreamFailed as exc:
            raise bad_gateway(f"decode unreachable: {exc}") from exc

    def _allow_fallback(self, reason: str, message: str, timeout: bool = False) -> str:
        """Returns the fallback reason when decode-only is allowed, else raises the client error."""
        if self.config.fallback == "decode-only":
            return reason
        if reason != "prefill_failed":
            raise unavailable(message, code="no_prefill_decode_pair")
        raise gateway_timeout(message) if timeout else bad_gateway(message)

    def _failed(self, state: EndpointState, outcome: str) -> None:
        role = state.endpoint.role
        self.metrics.child(self.metrics.upstream, role, outcome).inc()
        if self.registry.record_failure(state):
            self.metrics.child(self.metrics.ejections, role).inc()
            log.warning("ejected %s %s after consecutive failures", role, state.endpoint.url)

    def _succeeded(self, state: EndpointState) -> None:
        self.metrics.child(self.metrics.upstream, state.endpoint.role, "ok").inc()
        self.registry.record_success(state)

    async def _prefill(
        self, state: EndpointState, parsed: ParsedRequest, headers: dict[str, str]
    ) -> dict[str, Any] | None:
        url = state.endpoint.url + parsed.path
        data = json.dumps(build_prefill_body(parsed)).encode()
        start = time.perf_counter()
        timeout = self.config.first_byte_timeout_s
        with self.registry.lease(state):
            try:
                resp = await self.pool.request(
                    "POST", state.endpoint.url, parsed.path, headers, data,
                    connect_timeout=self.config.connect_timeout_s, headers_timeout=timeout,
                )  # fmt: skip
                try:
                    payload = await resp.read(timeout - (time.perf_counter() - start))
                finally:
                    resp.close()
                status, ctype = resp.status, resp.content_type
            except TimeoutError as exc:
                self._failed(state, "timeout")
                raise _UpstreamFailed(f"{url} timed out", timeout=True) from exc
            except UpstreamError as exc:
                self._failed(state, "error")
                raise _UpstreamFailed(f"{url}: {exc}") from exc
        self.metrics.prefill_duration.observe(time.perf_counter() - start)
        if status >= 500:
            self._failed(state, "http_5xx")
            raise _UpstreamFailed(f"{url} answered HTTP {status}")
        if status >= 400:
            self._succeeded(state)  # the endpoint works; the request was bad
            raise _Passthrough(status, payload, ctype)
        try:
            answer = json.loads(payload)
        except ValueError as exc:
            self._failed(state, "bad_answer")
            raise _UpstreamFailed(f"{url} answered invalid JSON") from exc
        self._succeeded(state)
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        return params if isinstance(params, dict) else None

    async def _decode(
        self,
        request: web.Request,
        state: EndpointState,
        parsed: ParsedRequest,
        body: bytes,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        url = state.endpoint.url + parsed.path
        config = self.config
        with self.registry.lease(state):
            try:
                resp = await self.pool.request(
                    "POST", state.endpoint.url, parsed.path, headers, body,
                    connect_timeout=config.connect_timeout_s,
                    headers_timeout=config.first_byte_timeout_s if parsed.stream else config.request_timeout_s,
                )  # fmt: skip
            except TimeoutError as exc:
                self._failed(state, "timeout")
                raise gateway_timeout(f"decode {url} timed out") from exc
            except UpstreamConnectError as exc:
                self._failed(state, "connect_error")
                raise _UpstreamFailed(f"{url}: {exc}", connect=True) from exc
            except UpstreamError as exc:
                self._failed(state, "error")
                raise bad_gateway(f"decode {url}: {exc}") from exc
            try:
                if resp.status != 200 or not parsed.stream:
                    return await self._whole_answer(state, resp, url)
                return await self._relay_stream(request, state, resp, headers["X-Request-Id"])
            finally:
                resp.close()  # back to the pool when read to the end, else the connection is dropped

    async def _whole_answer(self, state: EndpointState, resp: UpstreamResponse, url: str) -> web.Response:
        try:
            payload = await resp.read(self.config.request_timeout_s)
        except (TimeoutError, UpstreamError) as exc:
            self._failed(state, "error")
            raise bad_gateway(f"decode {url} broke off its answer: {exc!r}") from exc
        if resp.status >= 500:
            self._failed(state, "http_5xx")
        else:
            self._succeeded(state)
        return web.Response(status=resp.status, body=payload, content_type=resp.content_type)

    async def _relay_stream(
        self, request: web.Request, state: EndpointState, resp: UpstreamResponse, request_id: str
    ) -> web.StreamResponse:
        out = _EventStreamResponse(
            status=200,
            headers={
                "Content-Type": resp.headers.get("content-type", "text/event-stream"),
                "Cache-Control": "no-cache",
                "X-Request-Id": request_id,
            },
        )
        await out.prepare(request)
        events = _EventCutter()
        idle = self.config.idle_timeout_s
        try:
            # The first events are read here, so they leave in one write with the headers.
            while chunk := await resp.read_chunk(idle):
                if first := events.take(chunk):
                    await out.write(first)
                    await resp.relay(_client_sink(request, out, events), idle, request.writer.drain)
                    break
        except (TimeoutError, UpstreamError) as exc:
            self._failed(state, "stream_broken")
            reason = "went idle" if isinstance(exc, TimeoutError) else f"failed ({exc.__class__.__name__})"
            log.warning("decode stream from %s %s", state.endpoint.url, reason)
            if events.last:  # the answer is whole ([DONE] came); only the upstream's end of body is missing
                await out.write_eof(events.last)
                return out
            self.metrics.stream_errors.inc()
            await out.write_eof(sse_error_event(f"upstream decode stream {reason} mid-response"))
            return out
        self._succeeded(state)
        await out.write_eof(events.last + events.pending)
        return out


class _EventCutter:
    """Cuts a relayed SSE stream at event boundaries, so a write never ends inside an event (an
    error event appended after a failure must start on a boundary)."""

    __slots__ = ("last", "pending")

    def __init__(self) -> None:
        self.pending = b""  # the start of an event whose end has not arrived
        # Whole events ending with `data: [DONE]`: held until the upstream's end of body (which
        # vLLM sends right after), so they leave in the same write as the end of the client's
        # body. An upstream that stalls there delays them by at most the idle timeout.
        self.last = b""

    def take(self, chunk: bytes) -> bytes:
        """The whole events to forward now (b"" when none)."""
        pending = self.pending
        data = pending + chunk if pending else chunk
        cut = data.rfind(_EVENT_END)
        if cut < 0:
            if len(data) <= _MAX_PENDING:
                self.pending = data
                return b""
            cut = len(data) - len(_EVENT_END)  # not SSE framing after all: stop holding it back
        cut += len(_EVENT_END)
        pending = self.pending = data[cut:]
        events = data[:cut] if pending else data
        if self.last:  # more came after [DONE]: relay it unchanged, in order
            events, self.last = self.last + events, b""
        if not pending and events.endswith(_DONE_EVENT):
            self.last = events
            return b""
        return events


def _client_sink(
    request: web.Request, out: web.StreamResponse, events: _EventCutter
) -> Callable[[bytes], bool]:
    """Writes relayed events straight to the client's transport, from the upstream connection's
    data callback (see `UpstreamResponse.relay`), framed as `out` frames its body (chunked for
    HTTP/1.1; `out` already sent its headers and sends the end of the body). Returns False once
    the client's socket buffer is above its high-water mark (aiohttp's protocol then has writing
    paused), which pauses the upstream until it drained - the back-pressure `out.write()` gives."""
    transport, protocol = request.transport, request.protocol
    chunked = out.headers.get("Transfer-Encoding") == "chunked"  # as prepare() chose and sent it

    def sink(chunk: bytes) -> bool:
        data = events.take(chunk)
        if data and transport is not None and not transport.is_closing():
            transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        return not protocol.writing_paused

    return sink
