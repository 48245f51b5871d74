"""The router's upstream HTTP client (ucm.router.upstream) against real HTTP test upstreams:
keep-alive reuse, bodies read whole or as chunks, and each failure mapped to its exception."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from ucm.router.upstream import UpstreamConnectError, UpstreamError, UpstreamPool

STREAM = json.dumps({"prompt": "x", "stream": True, "max_tokens": 3}).encode()
JSON = {"Content-Type": "application/json"}


async def _drain(pool: UpstreamPool, url: str, body: bytes = STREAM) -> bytes:
    resp = await pool.request(
        "POST", url, "/v1/completions", JSON, body, connect_timeout=2, headers_timeout=2
    )
    try:
        assert resp.status == 200
        data = b""
        while chunk := await resp.read_chunk(2):
            data += chunk
        return data
    finally:
        resp.close()


async def test_keep_alive_connections_are_reused(make_upstream) -> None:
    up = await make_upstream("decode", "d0", token_delay_s=0.02)
    pool = UpstreamPool()
    try:
        for _ in range(3):
            assert (await _drain(pool, up.url)).endswith(b"data: [DONE]\n\n")
        resp = await pool.request("GET", up.url, "/health", {}, connect_timeout=2, headers_timeout=2)
        assert resp.status == 200 and resp.content_type == "application/json" and await resp.read(2) == b"{}"
        resp.close()
        assert pool.opened == 1
        # a response dropped before its end takes its connection with it
        resp = await pool.request(
            "POST", up.url, "/v1/completions", JSON, STREAM, connect_timeout=2, headers_timeout=2
        )
        resp.close()
        await _drain(pool, up.url)
        assert pool.opened == 2
    finally:
        await pool.close()


async def test_a_body_cut_off_mid_stream_raises(make_upstream) -> None:
    up = await make_upstream("decode", "d0", break_after_tokens=1)
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamError, match="closed the connection mid-answer"):
            await _drain(pool, up.url)
    finally:
        await pool.close()


async def test_connect_error_and_header_timeout(make_upstream) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    hung = await make_upstream("decode", "d0", hang=True)
    pool = UpstreamPool()
    try:
        with pytest.raises(UpstreamConnectError, match="cannot connect"):
            await _drain(pool, dead)
        with pytest.raises(TimeoutError):
            await pool.request(
                "POST", hung.url, "/v1/completions", JSON, STREAM, connect_timeout=2, headers_timeout=0.2
            )
        with pytest.raises(ValueError, match="http"):
            await _drain(pool, "ftp://example")
    finally:
        await pool.close()


async def test_relay_pushes_the_body_and_pauses_the_upstream_while_the_sink_is_full(make_upstream) -> None:
    up = await make_upstream("decode", "d0", token_delay_s=0.05, tokens=6)
    pool = UpstreamPool()
    try:
        resp = await pool.request(
            "POST", up.url, "/v1/completions", JSON, STREAM, connect_timeout=2, headers_timeout=2
        )
        got: list[bytes] = []
        full = True
        drained = asyncio.Event()

        def sink(data: bytes) -> bool:
            got.append(data)
            return not full

        relay = asyncio.create_task(resp.relay(sink, 0.2, drained.wait))
        # Longer than the idle timeout: time spent waiting for the sink's consumer does not count,
        # and while it waits nothing more is read from the upstream (reading is paused).
        await asyncio.sleep(0.5)
        assert len(got) == 1 and resp._conn.paused and not relay.done()
        full = False
        drained.set()
        await asyncio.wait_for(relay, 5)
        assert len(got) > 1 and b"".join(got).endswith(b"data: [DONE]\n\n")
        assert b"".join(got).count(b"data: ") == 7  # 6 tokens and [DONE], each once
        resp.close()
        # read to the end and resumed, the connection went back to the pool and works
        assert (await _drain(pool, up.url)).endswith(b"data: [DONE]\n\n")
        assert pool.opened == 1
        # an upstream silent for longer than the idle timeout ends the relay with TimeoutError
        slow = await make_upstream("decode", "d-slow", token_delay_s=1.0, tokens=3)
        resp = await pool.request(
            "POST", slow.url, "/v1/completions", JSON, STREAM, connect_timeout=2, headers_timeout=2
        )
        with pytest.raises(TimeoutError):
            await resp.relay(lambda data: True, 0.2, drained.wait)
        resp.close()
    finally:
        await pool.close()
