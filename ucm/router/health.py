"""Active health probes and static discovery.

Passive ejection (endpoints.py) reacts only to traffic; an idle endpoint that died, or one
that came back after ejection, is found by probing `GET /health` (vLLM answers 200 once its
engine is up) every `interval_s`. A failed probe takes the endpoint out of rotation until a
probe succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from ucm.router.endpoints import Endpoint, EndpointState, Registry
from ucm.router.upstream import UpstreamError, UpstreamPool

log = logging.getLogger("ucm.router")


class Discovery(Protocol):
    """Feeds the registry with the current endpoint set until stopped."""

    async def start(self, registry: Registry) -> None: ...

    async def stop(self) -> None: ...


class StaticDiscovery:
    """Fixed URL lists (flags or environment); every endpoint belongs to one revision."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str], revision: str = "static") -> None:
        self.endpoints = [Endpoint(_base_url(u), "prefill", revision, name=_base_url(u)) for u in prefill] + [
            Endpoint(_base_url(u), "decode", revision, name=_base_url(u)) for u in decode
        ]

    async def start(self, registry: Registry) -> None:
        registry.set_endpoints(self.endpoints)

    async def stop(self) -> None:
        return None


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


class HealthProber:
    def __init__(self, registry: Registry, pool: UpstreamPool, interval_s: float, timeout_s: float) -> None:
        self.registry = registry
        self.pool = pool
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ucm-router-health-probes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(s) for s in self.registry.states()))

    async def _run(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.interval_s)

    async def _probe(self, state: EndpointState) -> None:
        t = self.timeout_s
        try:
            async with asyncio.timeout(t):
                resp = await self.pool.request(
                    "GET", state.endpoint.url, "/health", {}, connect_timeout=t, headers_timeout=t
                )
                try:
                    await resp.read(t)
                finally:
                    resp.close()
                ok = resp.status == 200
        except (TimeoutError, UpstreamError):
            ok = False
        if ok != state.probe_ok:
            log.warning(
                "%s %s health probe: %s", state.endpoint.role, state.endpoint.url, "ok" if ok else "failing"
            )
        state.probe_ok = ok
