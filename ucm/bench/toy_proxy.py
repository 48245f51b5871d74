"""The baseline of `ucm bench router`: a toy PD proxy built like the seed's.

Round-robin prefill and decode, and a new HTTP client session (so a new TCP connection) for every
upstream call. `ucm bench router` runs it as `python -m ucm.bench.toy_proxy --prefill URL ...
--decode URL ...` in its own process; it prints `listening on 127.0.0.1:PORT` on stderr once it
accepts connections and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys

import aiohttp
from aiohttp import web

from ucm.router.loop import run
from ucm.router.openai_request import PREFILL_KV_TRANSFER_PARAMS


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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ucm.bench.toy_proxy", description="the baseline toy proxy")
    parser.add_argument("--prefill", action="append", required=True)
    parser.add_argument("--decode", action="append", required=True)
    args = parser.parse_args(argv)
    run(_serve_toy(args.prefill, args.decode))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
