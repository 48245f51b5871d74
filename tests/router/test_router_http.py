"""The router end to end over real HTTP against fake vLLM upstreams that check the
kv_transfer_params protocol (ucm.bench.fake_upstreams)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp

from ucm.bench.fake_upstreams import metric_value, sse_events
from ucm.router.server import RouterServer

MODEL = "fake-model"
LONG = "You are a helpful assistant. " * 40  # > 1 KiB: a full affinity prefix


def u(server: RouterServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def metrics(http: aiohttp.ClientSession, server: RouterServer) -> str:
    async with http.get(u(server, "/metrics")) as resp:
        return await resp.text()


async def post(http: aiohttp.ClientSession, server: RouterServer, path: str, body: Any) -> tuple[int, Any]:
    async with http.post(u(server, path), json=body) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def post_stream(
    http: aiohttp.ClientSession, server: RouterServer, body: Any, path: str = "/v1/completions"
) -> tuple[int, list[str]]:
    """The status and the SSE events of a streamed answer, read to its end."""
    async with http.post(u(server, path), json=body) as resp:
        return resp.status, sse_events(await resp.text())


async def test_completion_non_stream_goes_prefill_then_decode(make_upstream, make_router, http) -> None:
    p = await make_upstream("prefill", "p0")
    d = await make_upstream("decode", "d0", require_kv_params=True)
    router = await make_router([p], [d])
    status, body = await post(
        http, router, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5}
    )
    assert status == 200, body
    assert body["choices"][0]["text"] == " t0 t1 t2 t3 t4" and body["usage"]["completion_tokens"] == 5
    assert len(p.requests) == 1 and len(d.requests) == 1
    params = d.requests[0].body["kv_transfer_params"]
    assert params["remote_engine_id"] == "p0" and params["do_remote_prefill"] is True
    assert d.requests[0].body["max_tokens"] == 5  # the client's own request, unchanged otherwise
    assert p.requests[0].headers["X-Request-Id"] == d.requests[0].headers["X-Request-Id"]
    # bodies are relayed as they come, so upstreams are asked not to compress them
    assert p.requests[0].headers["Accept-Encoding"] == d.requests[0].headers["Accept-Encoding"] == "identity"
    assert metric_value(await metrics(http, router), "ucm_router_pd_requests_total") == 1


async def test_completion_stream_is_relayed_unchanged_with_usage(make_upstream, make_router, http) -> None:
    p = await make_upstream("prefill", "p0")
    d = await make_upstream("decode", "d0", require_kv_params=True)
    router = await make_router([p], [d])
    req = {
        "model": MODEL,
        "prompt": LONG,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(u(router, "/v1/completions"), json=req) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [f" t{i}" for i in range(6)]
    assert chunks[-1]["usage"] == {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}
    assert (
        "stream_options" not in p.requests[0].body and d.requests[0].body["stream_options"]["include_usage"]
    )


async def test_chat_stream_and_non_stream(make_upstream, make_router, http) -> None:
    p = await make_upstream("prefill", "p0")
    d = await make_upstream("decode", "d0", require_kv_params=True)
    router = await make_router([p], [d])
    msgs = [
        {"role": "system", "content": LONG},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    status, body = await post(
        http, router, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_completion_tokens": 3}
    )
    assert status == 200 and body["choices"][0]["message"]["content"] == " t0 t1 t2"
    assert p.requests[0].body["max_completion_tokens"] == 1 and p.requests[0].body["max_tokens"] == 1
    _, events = await post_stream(
        http,
        router,
        {"model": MODEL, "messages": msgs, "max_tokens": 2, "stream": True},
        "/v1/chat/completions",
    )
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": " t0"}, {"content": " t1"}]
    assert events[-1] == "[DONE]"


async def test_models_health_ready_and_debug_view(make_upstream, make_router, http) -> None:
    p = await make_upstream("prefill", "p0")
    d = await make_upstream("decode", "d0")
    router = await make_router([p], [d])
    assert (await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"}))[0] == 200
    async with http.get(u(router, "/v1/models")) as resp:
        assert (await resp.json())["data"][0]["id"] == MODEL
    async with http.get(u(router, "/health")) as resp:
        assert resp.status == 200
    async with http.get(u(router, "/ready")) as resp:
        assert resp.status == 200
    async with http.get(u(router, "/debug/endpoints")) as resp:
        view = await resp.json()
    assert view["complete_revisions"] == ["r1"] and view["revisions"]["r1"]["prefill"][0]["requests"] == 1
    # no prefill at all and fallback=fail: not ready
    only_decode = await make_router([], [d], fallback="fail")
    async with http.get(u(only_decode, "/ready")) as resp:
        assert resp.status == 503 and not (await resp.json())["ready"]
    decode_only = await make_router([], [d], fallback="decode-only")
    async with http.get(u(decode_only, "/ready")) as resp:
        assert resp.status == 200 and "decode-only" in (await resp.json())["reason"]


async def test_fallback_decode_only_is_counted(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d])  # no prefill endpoint at all
    status, _body = await post(
        http, router, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}
    )
    assert status == 200 and "kv_transfer_params" not in d.requests[0].body
    broken = await make_upstream("prefill", "p-bad", fail_status=500)
    router2 = await make_router([broken], [d])
    status, _ = await post(http, router2, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 200 and "kv_transfer_params" not in d.requests[1].body
    text = await metrics(http, router) + await metrics(http, router2)
    assert metric_value(text, 'ucm_router_fallbacks_total{reason="no_pair"}') == 1
    assert metric_value(text, 'ucm_router_fallbacks_total{reason="prefill_failed"}') == 1


async def test_fallback_fail_answers_5xx(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0")
    broken = await make_upstream("prefill", "p-bad", fail_status=500)
    router = await make_router([], [d], fallback="fail")
    status, body = await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 503 and body["error"]["code"] == "no_prefill_decode_pair"
    router2 = await make_router([broken], [d], fallback="fail")
    status, body = await post(http, router2, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 502 and "prefill failed" in body["error"]["message"]
    assert d.requests == []


async def test_prefill_4xx_passes_through(make_upstream, make_router, http) -> None:
    p = await make_upstream("prefill", "p0", fail_status=400)
    d = await make_upstream("decode", "d0")
    router = await make_router([p], [d])
    status, body = await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 400 and "configured to fail" in body["error"]["message"] and d.requests == []


async def test_revisions_never_mix(make_upstream, make_router, http) -> None:
    pa, da = await make_upstream("prefill", "pa"), await make_upstream("decode", "da", require_kv_params=True)
    pb, db = await make_upstream("prefill", "pb"), await make_upstream("decode", "db", require_kv_params=True)
    eps = [pa.endpoint("A", 1), da.endpoint("A", 1), pb.endpoint("B", 2), db.endpoint("B", 2)]
    router = await make_router(endpoints=eps, policy="least-loaded")
    reqs = [
        post(http, router, "/v1/completions", {"model": MODEL, "prompt": f"q{i}", "max_tokens": 2})
        for i in range(24)
    ]
    assert all(status == 200 for status, _ in await asyncio.gather(*reqs))
    assert {r.body["kv_transfer_params"]["remote_engine_id"] for r in da.requests} <= {"pa"}
    assert {r.body["kv_transfer_params"]["remote_engine_id"] for r in db.requests} <= {"pb"}
    assert da.requests and db.requests  # concurrent load used both revisions
    # rollout state where each revision has only one role left: no pair, no mixing
    router.discovery.update([pa.endpoint("A", 1), db.endpoint("B", 2)])  # type: ignore[attr-defined]
    before = len(pa.requests)
    status, _ = await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 400  # db requires params; fallback sent it decode-only, never via pa
    assert len(pa.requests) == before


async def test_prefix_affinity_pins_a_prefix_to_one_prefill(make_upstream, make_router, http) -> None:
    prefills = [await make_upstream("prefill", f"p{i}") for i in range(3)]
    d = await make_upstream("decode", "d0")
    router = await make_router(prefills, [d])
    for i in range(6):  # same long prefix, different tails
        status, _ = await post(
            http,
            router,
            "/v1/completions",
            {"model": MODEL, "prompt": LONG + f" question {i}", "max_tokens": 1},
        )
        assert status == 200
    assert sorted(len(p.requests) for p in prefills) == [0, 0, 6]
    for i in range(12):
        await post(
            http, router, "/v1/completions", {"model": MODEL, "prompt": f"{i} " + LONG, "max_tokens": 1}
        )
    assert sum(1 for p in prefills if p.requests) >= 2  # distinct prefixes spread out
    assert metric_value(await metrics(http, router), 'ucm_router_prefix_affinity_total{result="hit"}') == 18


async def test_failing_endpoint_is_ejected(make_upstream, make_router, http) -> None:
    bad = await make_upstream("decode", "bad", fail_status=503)
    good = await make_upstream("decode", "good")
    p = await make_upstream("prefill", "p0")
    router = await make_router([p], [bad, good], eject_after_failures=2, eject_base_s=30)
    statuses = [
        (await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"}))[0] for _ in range(8)
    ]
    assert len(bad.requests) == 2  # ejected after two consecutive failures
    assert statuses.count(503) == 2 and statuses.count(200) == 6
    text = await metrics(http, router)
    assert metric_value(text, 'ucm_router_ejections_total{role="decode"}') == 1
    assert metric_value(text, 'ucm_router_endpoints{available="false",revision="r1",role="decode"}') == 1


async def test_active_probe_takes_unhealthy_endpoint_out(make_upstream, make_router, http) -> None:
    sick = await make_upstream("decode", "sick", healthy=False)
    good = await make_upstream("decode", "good")
    router = await make_router([], [sick, good], probe_interval_s=0.05)
    for _ in range(100):
        if not next(s for s in router.registry.states() if s.endpoint.name == "sick").probe_ok:
            break
        await asyncio.sleep(0.02)
    for _ in range(4):
        assert (await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"}))[0] == 200
    assert sick.requests == [] and len(good.requests) == 4
    sick.behavior.healthy = True
    for _ in range(100):
        if next(s for s in router.registry.states() if s.endpoint.name == "sick").probe_ok:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("recovered endpoint never came back")


async def test_timeouts(make_upstream, make_router, http) -> None:
    hung_prefill = await make_upstream("prefill", "p-hang", hang=True)
    d = await make_upstream("decode", "d0")
    router = await make_router([hung_prefill], [d], first_byte_timeout_s=0.3)
    status, _ = await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 200 and len(d.requests) == 1  # prefill timed out -> decode-only fallback
    hung_decode = await make_upstream("decode", "d-hang", hang=True)
    router2 = await make_router([], [hung_decode], first_byte_timeout_s=0.3, request_timeout_s=0.3)
    for stream in (True, False):
        status, body = await post(
            http, router2, "/v1/completions", {"model": MODEL, "prompt": "x", "stream": stream}
        )
        assert status == 504 and body["error"]["code"] == "upstream_timeout"
    slow = await make_upstream("decode", "d-slow", token_delay_s=1.0, tokens=3)
    router3 = await make_router([], [slow], idle_timeout_s=0.3)
    _, events = await post_stream(http, router3, {"model": MODEL, "prompt": "x", "stream": True})
    assert json.loads(events[0])["choices"][0]["text"] == " t0"  # first token at once, then silence
    assert "went idle" in json.loads(events[1])["error"]["message"] and events[2:] == ["[DONE]"]


async def test_mid_stream_failure_ends_with_error_event(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0", break_after_tokens=2, tokens=5)
    router = await make_router([], [d])
    status, events = await post_stream(http, router, {"model": MODEL, "prompt": "x", "stream": True})
    assert status == 200  # and every event well formed: no half event leaked
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == [" t0", " t1"]
    error = json.loads(events[2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and "mid-response" in error["message"]
    assert events[3:] == ["[DONE]"]
    assert metric_value(await metrics(http, router), "ucm_router_stream_errors_total") == 1


async def test_failure_after_done_keeps_the_whole_answer(make_upstream, make_router, http) -> None:
    """The upstream dies after `data: [DONE]` (its chunked end missing): the client already has the
    whole answer, so it gets it unchanged with no error event; the endpoint's failure still counts."""
    d = await make_upstream("decode", "d0", break_after_done=True, tokens=3)
    router = await make_router([], [d])
    status, events = await post_stream(http, router, {"model": MODEL, "prompt": "x", "stream": True})
    assert status == 200
    assert [json.loads(e)["choices"][0]["text"] for e in events[:3]] == [" t0", " t1", " t2"]
    assert events[3:] == ["[DONE]"]
    text = await metrics(http, router)
    assert metric_value(text, "ucm_router_stream_errors_total") == 0
    assert (
        metric_value(text, 'ucm_router_upstream_requests_total{outcome="stream_broken",role="decode"}') == 1
    )


async def test_inflight_gauge_counts_open_streams(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0", token_delay_s=0.2, tokens=5)
    router = await make_router([], [d])
    async with http.post(
        u(router, "/v1/completions"), json={"model": MODEL, "prompt": "x", "stream": True}
    ) as resp:
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
        assert metric_value(await metrics(http, router), "ucm_router_inflight_requests") == 1
        await resp.read()
    await _wait_for(lambda: router.inflight == 0)
    assert metric_value(await metrics(http, router), "ucm_router_inflight_requests") == 0


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_client_disconnect_cancels_upstreams(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0", token_delay_s=0.2, tokens=50)
    p = await make_upstream("prefill", "p0")
    router = await make_router([p], [d])
    resp = await http.post(u(router, "/v1/completions"), json={"model": MODEL, "prompt": "x", "stream": True})
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
    resp.close()  # the client goes away mid-stream
    await _wait_for(lambda: d.cancelled == 1 and d.active == 0)
    # a client that leaves while prefill is still running cancels the prefill request too
    hung = await make_upstream("prefill", "p-hang", hang=True)
    router2 = await make_router([hung], [d])
    with_timeout = aiohttp.ClientTimeout(total=0.3)
    try:
        await http.post(
            u(router2, "/v1/completions"), json={"model": MODEL, "prompt": "x"}, timeout=with_timeout
        )
    except TimeoutError:
        pass
    await _wait_for(lambda: hung.cancelled == 1 and hung.active == 0)
    await _wait_for(lambda: router2.inflight == 0)
    assert metric_value(await metrics(http, router2), "ucm_router_client_disconnects_total") == 1


async def test_graceful_shutdown_drains_streams(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0", token_delay_s=0.05, tokens=10)
    router = await make_router([], [d], drain_timeout_s=10)
    resp = await http.post(u(router, "/v1/completions"), json={"model": MODEL, "prompt": "x", "stream": True})
    first = await resp.content.readuntil(b"\n\n")
    shutdown = asyncio.create_task(router.shutdown())
    await asyncio.sleep(0.05)
    assert router.draining
    try:  # new connections are refused while draining
        await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"})
        raise AssertionError("accepted a request while draining")
    except aiohttp.ClientConnectionError:
        pass
    rest = await resp.read()
    events = sse_events((first + rest).decode())
    assert len(events) == 11 and events[-1] == "[DONE]"  # the in-flight stream finished whole
    await shutdown


async def test_bad_requests_get_openai_errors(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], max_body_bytes=4096)
    cases = [
        (b"{oops", 400, None),
        (b'{"model": "gpt-4", "prompt": "x"}', 404, "model"),
        (b'{"model": "fake-model", "prompt": {"a": 1}}', 400, "prompt"),
        (b'{"model": "fake-model", "prompt": "x", "stream": 1}', 400, "stream"),
        (json.dumps({"model": MODEL, "prompt": "x" * 5000}).encode(), 413, None),
    ]
    for raw, status, param in cases:
        async with http.post(
            u(router, "/v1/completions"), data=raw, headers={"Content-Type": "application/json"}
        ) as resp:
            body = await resp.json()
            assert resp.status == status, body
            assert (
                set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param
            )

    async def chunked():  # no Content-Length: the limit still holds while reading
        for _ in range(10):
            yield b"x" * 1000

    async with http.post(u(router, "/v1/completions"), data=chunked()) as resp:
        assert resp.status == 413 and "limit is 4096" in (await resp.json())["error"]["message"]
    status, body = await post(http, router, "/v1/chat/completions", {"model": MODEL, "messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    assert d.requests == []


async def test_concurrency_limit_rejects_instead_of_queueing(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0", token_delay_s=0.1, tokens=5)
    router = await make_router([], [d], max_concurrent=2)
    streams = [
        await http.post(u(router, "/v1/completions"), json={"model": MODEL, "prompt": "x", "stream": True})
        for _ in range(2)
    ]
    status, body = await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 503 and body["error"]["code"] == "overloaded"
    for s in streams:
        assert (await s.read()).endswith(b"data: [DONE]\n\n")
        s.release()
    assert (await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"}))[0] == 200


async def test_unreachable_decode_is_retried_once_elsewhere(make_upstream, make_router, http) -> None:
    good = await make_upstream("decode", "good")
    dead = await make_upstream("decode", "dead")
    router = await make_router([], [dead, good])
    await router.prober.probe_all()  # both healthy now; the next probe is a minute away
    await dead.close()  # its port now refuses connections, which the router learns from traffic
    for _ in range(4):
        assert (await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"}))[0] == 200
    assert len(good.requests) == 4
    text = await metrics(http, router)
    assert (
        metric_value(text, 'ucm_router_upstream_requests_total{outcome="connect_error",role="decode"}') >= 1
    )
    # with nowhere else to go the client gets a 502 naming the cause
    for state in router.registry.states():
        if state.endpoint.name == "good":
            state.probe_ok = False
        else:
            state.ejected_until = 0.0
    status, body = await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"})
    assert status == 502 and "decode unreachable" in body["error"]["message"]


async def test_shutdown_delay_fails_readiness_but_keeps_serving(make_upstream, make_router, http) -> None:
    d = await make_upstream("decode", "d0")
    router = await make_router([], [d], shutdown_delay_s=1.0)
    shutdown = asyncio.create_task(router.shutdown())
    await asyncio.sleep(0.1)
    async with http.get(u(router, "/ready")) as resp:
        assert resp.status == 503 and (await resp.json())["reason"] == "shutting down"
    assert (await post(http, router, "/v1/completions", {"model": MODEL, "prompt": "x"}))[0] == 200
    await shutdown
    assert router.draining


async def test_a_slow_client_pauses_the_decode_upstream_and_still_gets_every_event(
    make_upstream, make_router
) -> None:
    # ~0.3 MB of events, paced: sent at once, the whole body could fit in loopback's socket
    # buffers and reach the router before its client side fills, leaving nothing to pause
    d = await make_upstream("decode", "d0", tokens=2000, token_delay_s=0.0002)
    p = await make_upstream("prefill", "p0")
    router = await make_router([p], [d])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads slowly
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", router.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=8192)  # reads <= 16 KiB ahead
    # small kernel buffers on the router's side too, so its own write buffer fills (not the kernel's)
    server = router._runner.server if router._runner is not None else None
    assert server is not None
    await _wait_for(lambda: len(server.connections) == 1)
    transport = server.connections[0].transport
    assert transport is not None
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    try:
        # Nothing is read: once the router's socket buffer to the client is full, it stops reading
        # from the decode upstream instead of buffering the stream in memory.
        await asyncio.sleep(0.3)
        assert router.inflight == 1
        await _wait_for(lambda: any(conn.paused for conn in router.proxy.pool._busy))
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            data += await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in data
    assert data.count(b"data: ") == 2001 and data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert b"error" not in data
