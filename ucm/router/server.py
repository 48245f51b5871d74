"""The router's HTTP server: OpenAI routes, health, readiness, metrics, lifecycle.

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
GET /health (liveness: the process serves HTTP), GET /ready (readiness: a revision-coherent
prefill+decode pair is available, or a decode endpoint with `fallback=decode-only`; 503 while
draining), GET /metrics (Prometheus), GET /debug/endpoints (the router's endpoint view).

Admission: at most `max_concurrent` requests in flight; the next one gets 503 with Retry-After
at once (there is no queue to grow without bound). Bodies above `max_body_bytes` get 413, bodies
that do not arrive within `body_timeout_s` 408. Every error the router answers itself, aiohttp's
own included (404/405 routes, malformed HTTP, header limits, the header-read timeout: see
`ucm.router.connection`), is an OpenAI-style JSON error.

Shutdown (`shutdown()`, wired to SIGTERM by the CLI): readiness turns 503, the router keeps
serving for `shutdown_delay_s` (so Kubernetes takes it out of the Service first), then the
listening socket closes, in-flight requests and streams get up to `drain_timeout_s` to finish,
and the upstream pool closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web

from ucm.router.config import RouterConfig
from ucm.router.connection import ConnectionLimits, RouterAppRunner, parse_error_text
from ucm.router.endpoints import EjectionPolicy, Registry
from ucm.router.errors import ApiError, overloaded
from ucm.router.health import Discovery, HealthProber
from ucm.router.metrics import RouterMetrics
from ucm.router.openai_request import RequestKind, parse_request
from ucm.router.proxy import PDProxy

log = logging.getLogger("ucm.router")


class RouterServer:
    def __init__(self, config: RouterConfig, discovery: Discovery) -> None:
        self.config = config
        self.discovery = discovery
        self.registry = Registry(
            EjectionPolicy(config.eject_after_failures, config.eject_base_s, config.eject_max_s),
            affinity_slack=config.affinity_slack,
        )
        self.metrics = RouterMetrics(self.registry)
        self.metrics.track_inflight(lambda: self.inflight)
        self.proxy = PDProxy(config, self.registry, self.metrics)
        self.prober: HealthProber | None = None
        self.inflight = 0
        self.stopping = False  # readiness fails from here on
        self.draining = False  # new requests are refused from here on
        self.created = int(time.time())
        self.app = self._build_app()
        self._runner: RouterAppRunner | None = None
        self.port = config.port

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/completions", self._proxy_route("completions"))
        app.router.add_post("/v1/chat/completions", self._proxy_route("chat"))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/debug/endpoints", self._debug_endpoints)
        return app

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.proxy.start()
        await self.discovery.start(self.registry)
        if self.config.probe_interval_s > 0:
            self.prober = HealthProber(
                self.registry, self.proxy.pool, self.config.probe_interval_s, self.config.probe_timeout_s
            )
            self.prober.start()
        c = self.config
        limits = ConnectionLimits(c.max_header_bytes, c.max_headers, c.header_timeout_s)
        self._runner = RouterAppRunner(
            self.app, limits=limits, handler_cancellation=True, shutdown_timeout=c.drain_timeout_s,
            access_log=None,
        )  # fmt: skip
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=1024)
        await site.start()
        self.port = site.port
        log.info(
            "router for %s listening on %s:%d (policy=%s, fallback=%s, max_concurrent=%d); "
            "%d endpoint(s), complete revisions: %s",
            c.model, c.host, self.port, c.policy, c.fallback, c.max_concurrent,
            len(self.registry.states()), ", ".join(self.registry.complete_revisions()) or "none",
        )  # fmt: skip

    async def shutdown(self) -> None:
        """Fail readiness, wait shutdown_delay_s (still serving), stop accepting, let in-flight
        requests finish (bounded by drain_timeout_s), close."""
        self.stopping = True
        if self.config.shutdown_delay_s > 0:
            await asyncio.sleep(self.config.shutdown_delay_s)
        self.draining = True
        log.info("draining %d in-flight request(s)", self.inflight)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.prober is not None:
            await self.prober.stop()
        await self.discovery.stop()
        await self.proxy.close()

    # ---- handlers -------------------------------------------------------------------------
    def _proxy_route(self, kind: RequestKind) -> Any:
        route = kind

        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, route)

        return handler

    async def _serve(self, request: web.Request, kind: RequestKind) -> web.StreamResponse:
        metrics = self.metrics
        if self.draining:
            metrics.child(metrics.rejected, "draining").inc()
            return ApiError(
                503, "The router is shutting down.", type="service_unavailable", close=True
            ).response()
        if self.inflight >= self.config.max_concurrent:
            metrics.child(metrics.rejected, "overloaded").inc()
            return overloaded(
                f"The router is at its limit of {self.config.max_concurrent} concurrent requests; retry later."
            ).response()
        self.inflight += 1
        start = time.perf_counter()
        status = 500
        try:
            parsed = parse_request(
                await self._read_body(request), kind, self.config.model, self.proxy.keyer.text_limit
            )
            response = await self.proxy.handle(request, parsed)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            if exc.status < 500:
                metrics.child(metrics.rejected, exc.code or "invalid_request").inc()
            return exc.response()
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # client closed the request
            metrics.client_disconnects.inc()
            raise
        finally:
            self.inflight -= 1
            metrics.child(metrics.requests, kind, str(status)).inc()
            metrics.child(metrics.duration, kind).observe(time.perf_counter() - start)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        try:
            if request.content.is_eof():  # the usual small body came with the headers: no timer
                return await request.read()
            async with asyncio.timeout(self.config.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _too_large(None, limit) from exc
        except TimeoutError as exc:
            raise ApiError(
                408,
                f"The request body did not arrive within {self.config.body_timeout_s:g} s.",
                code="request_timeout",
                close=True,
            ) from exc
        except web.RequestPayloadError as exc:  # broken chunked framing, undecodable Content-Encoding
            raise ApiError(
                400, f"Malformed request body: {parse_error_text(exc)}", code="invalid_body", close=True
            ) from exc

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "created": self.created, "owned_by": "ucm"}
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        revisions = self.registry.complete_revisions()
        if revisions:
            return True, f"prefill+decode pairs in revision(s) {', '.join(revisions)}"
        if self.config.fallback == "decode-only" and self.registry.has_decode():
            return True, "no prefill+decode pair; serving decode-only (fallback)"
        return False, "no revision has an available prefill and decode endpoint"

    async def _ready(self, request: web.Request) -> web.Response:
        ok, reason = self.readiness()
        return web.json_response({"ready": ok, "reason": reason}, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _debug_endpoints(self, request: web.Request) -> web.Response:
        view = self.registry.snapshot()
        view["inflight"] = self.inflight
        view["ready"] = self.readiness()[0]
        return web.Response(body=json.dumps(view, indent=1).encode(), content_type="application/json")


def _too_large(size: int | None, limit: int) -> ApiError:
    got = f"{size} bytes" if size is not None else "more than that"
    return ApiError(
        413, f"Request body too large: the limit is {limit} bytes, got {got}.", code="request_too_large"
    )
