"""`ucm bench router`: latency and throughput the PD router adds, with same-run baselines.

Processes (so the router gets its own event loop, as in production):
* upstreams: `python -m ucm.router.testing` - fake prefill and decode servers (each request:
  a prefill answer, then a stream of `--tokens` SSE events with `--token-delay-ms` between);
* the router: `ucm router serve` with static lists of those upstreams;
* the baseline proxy: built like the seed's toy proxy - a new HTTP client session per request,
  round-robin prefill and decode;
* this process: the load generator (one keep-alive client session).

Each PD request is measured from send to the stream's `[DONE]`. "direct" is the load generator
doing the prefill -> decode hand-off itself against the upstreams (the same two upstream calls,
no proxy hop), so `added` = through-proxy minus direct at the same concurrency isolates what
the proxy costs. Throughput is completed PD streams per second at the highest concurrency.
The last output line is JSON (`--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web

from ucm.router.loop import run
from ucm.router.openai_request import PREFILL_KV_TRANSFER_PARAMS

MODEL = "bench-model"
PROMPT = "Summarise the history of the printing press in three sentences. " * 8


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per target and level")
    parser.add_argument("--tokens", type=int, default=16, help="SSE events per decode stream")
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--upstreams", type=int, default=2, help="prefill and decode servers each")
    parser.set_defaults(func=bench_main)


# ---- the baseline: a toy proxy like the seed's ---------------------------------------------
def _toy_proxy_app(prefill: list[str], decode: list[str]) -> web.Application:
    """Round robin, and a fresh ClientSession (so a fresh TCP connection) for every upstream call."""
    next_prefill, next_decode = itertools.cycle(prefill), itertools.cycle(decode)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        pre = dict(body, kv_transfer_params=dict(PREFILL_KV_TRANSFER_PARAMS), stream=False, max_tokens=1)
        pre.pop("stream_options", None)
        async with (
            aiohttp.ClientSession() as session,
            session.post(next(next_prefill) + request.path, json=pre) as resp,
        ):
            answer = await resp.json()
        if answer.get("kv_transfer_params"):
            body["kv_transfer_params"] = answer["kv_transfer_params"]
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        async with (
            aiohttp.ClientSession() as session,
            session.post(next(next_decode) + request.path, json=body) as resp,
        ):
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    return app


async def _serve_toy(prefill: list[str], decode: list[str]) -> None:
    runner = web.AppRunner(_toy_proxy_app(prefill, decode), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"listening on 127.0.0.1:{site.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# ---- load generation ------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _read_stream(resp: aiohttp.ClientResponse) -> None:
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
    tail = b""
    async for chunk in resp.content.iter_any():
        tail = (tail + chunk)[-32:]
    if not tail.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"stream did not end with [DONE]: {tail!r}")


def _cpu_seconds(pid: int | None) -> float:
    """User+system CPU time of a process (Linux /proc); 0 when unavailable."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Target:
    """One way to run a PD request: directly against the upstreams, or through a proxy (`pid`)."""

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        base: str | None,
        upstreams: dict[str, list[str]],
        pid: int | None = None,
    ) -> None:
        self.name, self.session, self.base, self.pid = name, session, base, pid
        self._prefill = itertools.cycle(upstreams["prefill"])
        self._decode = itertools.cycle(upstreams["decode"])

    async def one(self, tokens: int) -> None:
        body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "stream": True}
        if self.base is not None:  # through a proxy
            async with self.session.post(self.base + "/v1/completions", json=body) as resp:
                await _read_stream(resp)
            return
        pre = dict(body, kv_transfer_params=dict(PREFILL_KV_TRANSFER_PARAMS), stream=False, max_tokens=1)
        async with self.session.post(next(self._prefill) + "/v1/completions", json=pre) as resp:
            answer = await resp.json()
        body["kv_transfer_params"] = answer["kv_transfer_params"]
        async with self.session.post(next(self._decode) + "/v1/completions", json=body) as resp:
            await _read_stream(resp)


async def _measure(target: _Target, concurrency: int, seconds: float, tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    completed = 0  # including warm-up: the CPU counter covers it too
    warm_until = time.perf_counter() + min(0.3, seconds / 4)
    end = warm_until + seconds

    async def worker() -> None:
        nonlocal completed
        while True:
            start = time.perf_counter()
            if start >= end:
                return
            await target.one(tokens)
            completed += 1
            if start >= warm_until:
                latencies.append(time.perf_counter() - start)

    t0 = time.perf_counter()
    cpu0 = _cpu_seconds(target.pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - max(t0, warm_until)
    cpu = _cpu_seconds(target.pid) - cpu0
    return {
        "proxy_cpu_ms_per_request": cpu * 1e3 / max(completed, 1) if target.pid else 0.0,
        "p50_ms": _pct(latencies, 0.5) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "rps": len(latencies) / elapsed,
        "requests": float(len(latencies)),
    }


# ---- process management ---------------------------------------------------------------------
def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_port(proc: subprocess.Popen[str], what: str) -> int:
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"{what} exited before listening (rc={proc.poll()})")
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            # keep draining so a chatty child never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return int(found.group(1))
    raise RuntimeError(f"{what} did not start within 60 s")


async def _run_all(
    args: argparse.Namespace, upstreams: dict[str, list[str]], router: tuple[str, int], toy: tuple[str, int]
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        targets = [
            _Target("direct", session, None, upstreams),
            _Target("router", session, router[0], upstreams, router[1]),
            _Target("toy_proxy", session, toy[0], upstreams, toy[1]),
        ]
        for target in targets:  # connection set-up and first-call costs stay out of the numbers
            await asyncio.gather(*(target.one(args.tokens) for _ in range(8)))
        for level in args.concurrency:
            for target in targets:
                stats = await _measure(target, level, args.seconds, args.tokens)
                results.setdefault(str(level), {})[target.name] = stats
                print(
                    f"  c={level:<3} {target.name:<9} p50 {stats['p50_ms']:7.2f} ms  p99 {stats['p99_ms']:7.2f} ms"
                    f"  {stats['rps']:8.1f} req/s"
                    + (f"  proxy cpu {stats['proxy_cpu_ms_per_request']:.2f} ms/req" if target.pid else ""),
                    file=sys.stderr,
                    flush=True,
                )
    return results


def bench_main(args: argparse.Namespace) -> int:
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []
    try:
        up = _spawn(
            [
                py,
                "-m",
                "ucm.router.testing",
                "--prefill",
                str(args.upstreams),
                "--decode",
                str(args.upstreams),
                "--tokens",
                str(args.tokens),
                "--token-delay-s",
                str(args.token_delay_ms / 1e3),
                "--model",
                MODEL,
            ]
        )
        procs.append(up)
        assert up.stdout is not None
        upstreams = json.loads(up.stdout.readline())
        flags = [f for u in upstreams["prefill"] for f in ("--prefill", u)]
        flags += [f for u in upstreams["decode"] for f in ("--decode", u)]
        router = _spawn(
            [
                py,
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
                "--probe-interval",
                "30",
                *flags,
            ]
        )
        procs.append(router)
        toy = _spawn([py, "-m", "ucm.router.bench", *flags])
        procs.append(toy)
        router_url = f"http://127.0.0.1:{_wait_port(router, 'router')}"
        toy_url = f"http://127.0.0.1:{_wait_port(toy, 'toy proxy')}"
        print(
            f"PD streams of {args.tokens} events, {args.upstreams}+{args.upstreams} fake upstreams, "
            f"{args.seconds:.1f} s per point (cpus: {os.cpu_count()})",
            file=sys.stderr,
        )
        results = run(_run_all(args, upstreams, (router_url, router.pid), (toy_url, toy.pid)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    top = str(max(args.concurrency))
    summary: dict[str, Any] = {}
    for level, by_target in results.items():
        direct = by_target["direct"]
        for name in ("router", "toy_proxy"):
            summary[f"{name}_added_p50_ms_c{level}"] = round(by_target[name]["p50_ms"] - direct["p50_ms"], 3)
            summary[f"{name}_added_p99_ms_c{level}"] = round(by_target[name]["p99_ms"] - direct["p99_ms"], 3)
    out = {
        "added_p50_ms": summary[f"router_added_p50_ms_c{top}"],
        "added_p99_ms": summary[f"router_added_p99_ms_c{top}"],
        "router_rps": round(results[top]["router"]["rps"], 1),
        "toy_proxy_rps": round(results[top]["toy_proxy"]["rps"], 1),
        "direct_rps": round(results[top]["direct"]["rps"], 1),
        "router_cpu_ms_per_request": round(results[top]["router"]["proxy_cpu_ms_per_request"], 3),
        "toy_proxy_cpu_ms_per_request": round(results[top]["toy_proxy"]["proxy_cpu_ms_per_request"], 3),
        "router_vs_toy_throughput": round(
            results[top]["router"]["rps"] / results[top]["toy_proxy"]["rps"], 2
        ),
        "concurrency": int(top),
        **summary,
        "levels": results,
    }
    for key, value in out.items():
        if key != "levels" and not key.startswith(("router_added", "toy_proxy_added")):
            print(f"{key}: {value}")
    for level in results:
        print(
            f"c={level}: added p50/p99 router {summary[f'router_added_p50_ms_c{level}']}/"
            f"{summary[f'router_added_p99_ms_c{level}']} ms, toy {summary[f'toy_proxy_added_p50_ms_c{level}']}/"
            f"{summary[f'toy_proxy_added_p99_ms_c{level}']} ms"
        )
    if args.json:
        print(json.dumps(out))
    return 0


def _toy_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ucm.router.bench", description="the baseline toy proxy")
    parser.add_argument("--prefill", action="append", required=True)
    parser.add_argument("--decode", action="append", required=True)
    args = parser.parse_args(argv)
    run(_serve_toy(args.prefill, args.decode))
    return 0


if __name__ == "__main__":
    sys.exit(_toy_main(sys.argv[1:]))
