"""Fixtures for the router tests: fake vLLM upstreams and routers on loopback ports."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import pytest

from ucm.bench.fake_upstreams import FakeBehavior, FakeUpstream
from ucm.router.config import RouterConfig
from ucm.router.endpoints import Endpoint, Registry
from ucm.router.server import RouterServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "fake-model"


class ListDiscovery:
    """Discovery fed by the test: a list of endpoints with explicit revisions, changeable live."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self.registry: Registry | None = None

    async def start(self, registry: Registry) -> None:
        self.registry = registry
        registry.set_endpoints(self.endpoints)

    async def stop(self) -> None:
        return None

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        assert self.registry is not None
        self.registry.set_endpoints(self.endpoints)


MakeUpstream = Callable[..., Awaitable[FakeUpstream]]
MakeRouter = Callable[..., Awaitable[RouterServer]]


@pytest.fixture
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    started: list[FakeUpstream] = []

    async def make(role: str, name: str, **behavior: Any) -> FakeUpstream:
        up = FakeUpstream(role, name, FakeBehavior(**behavior), model=MODEL)  # type: ignore[arg-type]
        await up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.close()


@pytest.fixture
async def make_router() -> AsyncIterator[MakeRouter]:
    started: list[RouterServer] = []

    async def make(
        prefill: Iterable[FakeUpstream] = (),
        decode: Iterable[FakeUpstream] = (),
        *,
        endpoints: Iterable[Endpoint] | None = None,
        **overrides: Any,
    ) -> RouterServer:
        if endpoints is None:
            endpoints = [u.endpoint() for u in [*prefill, *decode]]
        overrides.setdefault("probe_interval_s", 60.0)
        config = RouterConfig(model=MODEL, host="127.0.0.1", port=0, **overrides)
        server = RouterServer(config, ListDiscovery(endpoints))
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        if not server.draining:
            await server.shutdown()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session
