"""`ucm router serve` as a real process: static discovery from flags/env, SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import aiohttp

from ucm.bench.fake_upstreams import sse_events

MODEL = "fake-model"


async def _start_router(
    *args: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ucm",
        "router",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        MODEL,
        *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, "router exited before listening"
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            return proc, int(found.group(1))


async def test_sigterm_drains_in_flight_stream(make_upstream) -> None:
    p = await make_upstream("prefill", "p0")
    d = await make_upstream("decode", "d0", token_delay_s=0.1, tokens=8, require_kv_params=True)
    proc, port = await _start_router("--prefill", p.url, "--decode", d.url + "/v1", "--drain-timeout", "20")
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "prompt": "x", "stream": True}
            async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
                first = await resp.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)
                rest = await resp.read()
        events = sse_events((first + rest).decode())
        assert len(events) == 9 and events[-1] == "[DONE]"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_static_lists_from_environment(make_upstream) -> None:
    d = await make_upstream("decode", "d0")
    proc, port = await _start_router("--fallback", "decode-only", env={"UCM_ROUTER_DECODE": d.url})
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/ready") as resp:
                assert resp.status == 200
            async with http.post(
                f"http://127.0.0.1:{port}/v1/completions", json={"model": MODEL, "prompt": "x"}
            ) as resp:
                assert resp.status == 200
        assert len(d.requests) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


def test_bad_command_lines_explain_themselves() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCM_ROUTER_")}
    run = subprocess.run(
        [sys.executable, "-m", "ucm", "router", "serve", "--model", MODEL],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2 and "at least one --decode URL" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "ucm", "router", "serve", "--model", MODEL, "--discovery", "kubernetes"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2 and "--cluster" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "ucm", "router", "serve", "--model", MODEL, "--discovery", "kubernetes",
         "--cluster", "c", "--namespace", "ns", "--kubeconfig", "/nonexistent/kubeconfig"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert (
        run.returncode == 2
        and "cannot load Kubernetes credentials from /nonexistent/kubeconfig" in run.stderr
    )
