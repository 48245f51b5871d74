"""`ucm bench router`: latency and throughput the PD router adds, with same-run baselines.

Processes (so the router gets its own event loop, as in production):
* upstreams: `python -m ucm.bench.fake_upstreams` - fake prefill and decode servers; each PD request
  is a prefill answer then a stream of `--tokens` token events, each stamped with the decode's
  CLOCK_MONOTONIC send time;
* the router: `ucm router serve` with static lists of those upstreams;
* the baseline proxy: `python -m ucm.bench.toy_proxy`, built like the seed's toy proxy - a new
  HTTP client session per request, round-robin prefill and decode;
* this process: the load generator, on the router's own upstream client (ucm.router.upstream:
  pooled keep-alive connections, the body relayed as it arrives) for every target alike - so the
  load generator's CPU per stream is as small as the router's client makes it.

"direct" is the load generator doing the prefill -> decode hand-off itself against the
upstreams (the same two upstream calls, no proxy hop), so through-proxy minus direct at the same
concurrency isolates what a proxy costs:

* latency runs (1, 16, 64 concurrent streams, decode paced at `--token-delay-ms` per token as a
  real decode is): time to first token (TTFT: send -> first token event, covering both proxy
  hops) and per-token delivery delay (token received - token sent by decode). `added_p99_ms` is
  the added TTFT p99 at the highest concurrency; `added_token_p99_ms` the added per-token p99.
  The streams of a point start spread over one stream's duration, not all at once: streams of
  equal length started together stay in lockstep, so every ~0.3 s all of them asked for a new
  stream in the same millisecond and the p99 timed that burst's queue (+10 ms through the router,
  against ~+2 ms spread), which steady traffic of that many streams never shows;
* throughput run (highest concurrency, unpaced streams): completed PD streams per second for
  direct, router and toy proxy, and each proxy's CPU time per request (from /proc, which stays
  meaningful when other processes compete for the CPUs).

CPU placement (`--pin`, on by default when this process may use 2+ CPUs): the proxy under test
(router or toy - measured in turn, so never both at once) runs alone on one CPU, and the load
generator and the upstreams share the other CPU(s), via os.sched_setaffinity. Otherwise, on a
small machine, the proxy and the processes feeding it compete for the same cores and each proxy
hop waits behind the load generator; pinned, the proxy's CPU is its own and "added" latency is
what the proxy costs, not what it displaces. Other work on the machine still shares both CPUs
(the JSON reports the load average and how long each proxy sat runnable but not running).
Each proxy also runs in its own session, so in its own scheduling group where the kernel's
sched_autogroup is on (see `_spawn`): in the load generator's group, the router - the lighter
proxy - lost up to 40% of its CPU to any other process on its CPU while the toy lost ~10%.

Pinned, "direct" keeps the whole hand-off (both upstream calls, the prefill answer's parse) on
the load generator's CPU while a proxy takes it off, so near saturation direct can be the slower
one and an "added" figure can come out negative; read it with the CPU columns.

Throughput is the completed streams per second; when the load-generator side saturates its CPU
first, both proxies show the same rps whatever they cost. The proxies' own efficiency is then
read from `*_cpu_ms_per_request` (user+system CPU time from /proc per completed request) and
`*_capacity_rps` = requests per CPU-second of the proxy: what one dedicated core would serve.
`loadgen_cpu_ms_per_request` (this process plus the upstreams) shows which side was the limit.

The last output line is JSON (`--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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

from ucm.bench.common import percentile
from ucm.process import die_with_parent
from ucm.router.loop import run
from ucm.router.openai_request import PREFILL_KV_TRANSFER_PARAMS
from ucm.router.upstream import UpstreamPool, UpstreamResponse

MODEL = "bench-model"
PROMPT = "Summarise the history of the printing press in three sentences. " * 8


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="measured time per target and point (4 s: ~750 streams per target at 64 paced streams, so the p99 is no single outlier)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="slices per point, targets taken in turn (evens out drifting load)",
    )
    parser.add_argument("--tokens", type=int, default=16, help="token events per decode stream")
    parser.add_argument(
        "--token-delay-ms",
        type=float,
        default=20.0,
        help="decode pacing in the latency runs (a real decode emits a token every 10-50 ms); "
        "the throughput run is unpaced",
    )
    parser.add_argument("--upstreams", type=int, default=2, help="prefill and decode servers each")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the proxy under test alone on one CPU, load generator and upstreams on the others "
        "(needs 2+ usable CPUs; see the module docstring)",
    )
    parser.set_defaults(func=bench_main)


# ---- load generation ------------------------------------------------------------------------
_STAMP = re.compile(rb'"t_sent": ([0-9.e+-]+)')


@dataclasses.dataclass
class _Sample:
    """One PD stream as the client saw it (monotonic seconds)."""

    ttft: float  # send -> first token event
    total: float  # send -> [DONE]
    event_delays: list[float]  # per token event: received - sent by the decode upstream


_JSON_HEADERS = {"Content-Type": "application/json"}
_TIMEOUT_S = 60.0


async def _post(pool: UpstreamPool, base: str, body: bytes) -> UpstreamResponse:
    return await pool.request(
        "POST", base, "/v1/completions", _JSON_HEADERS, body,
        connect_timeout=_TIMEOUT_S, headers_timeout=_TIMEOUT_S,
    )  # fmt: skip


async def _read_stream(resp: UpstreamResponse, start: float) -> _Sample:
    try:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read(_TIMEOUT_S))[:200]!r}")
        first = 0.0
        delays: list[float] = []
        tail = b""
        while chunk := await resp.read_chunk(_TIMEOUT_S):
            now = time.monotonic()
            stamps = _STAMP.findall(chunk)
            if stamps and not first:
                first = now
            delays.extend(now - float(t) for t in stamps)
            tail = (tail + chunk)[-32:]
    finally:
        resp.close()
    if not tail.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"stream did not end with [DONE]: {tail!r}")
    return _Sample((first or time.monotonic()) - start, time.monotonic() - start, delays)


def _cpu_seconds(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads (Linux /proc); zeros when
    unavailable."""
    if pid is None:
        return 0.0, 0.0
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _plan_cpus(pin: bool) -> tuple[set[int], set[int]] | None:
    """(CPU for the proxy under test, CPUs for the load generator and upstreams), or None when
    not pinning (asked not to, or fewer than 2 usable CPUs)."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        return None
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None
    return {usable[-1]}, set(usable[:-1])


def _runqueue_wait_seconds(pid: int | None) -> float:
    """Time a process's main thread spent runnable but waiting for a CPU (/proc/PID/schedstat is
    the thread-group leader's own line). That thread runs the event loop, so its wait is what
    delays requests; the proxies' other threads are the loop's idle resolver pool (measured:
    under 2% of a proxy's CPU, on the loop's CPU)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _Target:
    """One way to run a PD request: directly against the upstreams, or through a proxy (`pid`)."""

    def __init__(
        self,
        name: str,
        pool: UpstreamPool,
        base: str | None,
        upstreams: dict[str, list[str]],
        pid: int | None = None,
    ) -> None:
        self.name, self.pool, self.base, self.pid = name, pool, base, pid
        self._prefill = itertools.cycle(upstreams["prefill"])
        self._decode = itertools.cycle(upstreams["decode"])
        self._bodies: dict[tuple[int, float], tuple[dict[str, Any], bytes, bytes]] = {}

    def _body(self, tokens: int, token_delay_s: float) -> tuple[dict[str, Any], bytes, bytes]:
        """(the request, its bytes, the prefill request's bytes): the same for every stream of a
        run, so encoded once."""
        found = self._bodies.get((tokens, token_delay_s))
        if found is None:
            body: dict[str, Any] = {
                "model": MODEL,
                "prompt": PROMPT,
                "max_tokens": tokens,
                "stream": True,
                "fake_token_delay_s": token_delay_s,
                "fake_stamp": True,
            }
            pre = dict(body, kv_transfer_params=dict(PREFILL_KV_TRANSFER_PARAMS), stream=False, max_tokens=1)
            found = body, json.dumps(body).encode(), json.dumps(pre).encode()
            self._bodies[(tokens, token_delay_s)] = found
        return found

    async def one(self, tokens: int, token_delay_s: float) -> _Sample:
        body, raw, pre = self._body(tokens, token_delay_s)
        start = time.monotonic()
        if self.base is not None:  # through a proxy
            return await _read_stream(await _post(self.pool, self.base, raw), start)
        resp = await _post(self.pool, next(self._prefill), pre)
        try:
            answer = json.loads(await resp.read(_TIMEOUT_S))
        finally:
            resp.close()
        decode = json.dumps(dict(body, kv_transfer_params=answer["kv_transfer_params"])).encode()
        return await _read_stream(await _post(self.pool, next(self._decode), decode), start)


@dataclasses.dataclass
class _Run:
    """What one target did during one or more measured slices (merged across slices)."""

    samples: list[_Sample] = dataclasses.field(default_factory=list)
    completed: int = 0  # including warm-up: the CPU counters cover it too
    measured_s: float = 0.0  # time after warm-up (the denominator of throughput)
    wall_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    starved_s: float = 0.0
    loadgen_cpu_s: float = 0.0  # this process plus the upstreams

    def stats(self, proxied: bool) -> dict[str, float]:
        events = [d for s in self.samples for d in s.event_delays]
        done = max(self.completed, 1)
        cpu_s = self.cpu_user_s + self.cpu_sys_s
        return {
            "ttft_p50_ms": percentile([s.ttft for s in self.samples], 0.5) * 1e3,
            "ttft_p99_ms": percentile([s.ttft for s in self.samples], 0.99) * 1e3,
            "total_p50_ms": percentile([s.total for s in self.samples], 0.5) * 1e3,
            "total_p99_ms": percentile([s.total for s in self.samples], 0.99) * 1e3,
            "event_p50_ms": percentile(events, 0.5) * 1e3,
            "event_p99_ms": percentile(events, 0.99) * 1e3,
            "rps": len(self.samples) / self.measured_s,
            "streams": float(len(self.samples)),
            "proxy_cpu_ms_per_request": cpu_s * 1e3 / done if proxied else 0.0,
            "proxy_user_ms_per_request": self.cpu_user_s * 1e3 / done if proxied else 0.0,
            "proxy_sys_ms_per_request": self.cpu_sys_s * 1e3 / done if proxied else 0.0,
            # requests per CPU-second of the proxy: its throughput on one dedicated core
            "proxy_capacity_rps": self.completed / cpu_s if proxied and cpu_s > 0 else 0.0,
            # share of the run the proxy was runnable but not running (other processes had the CPUs)
            "proxy_cpu_starved": self.starved_s / self.wall_s if proxied else 0.0,
            "loadgen_cpu_ms_per_request": self.loadgen_cpu_s * 1e3 / done,
        }


def _loadgen_cpu_seconds(upstreams_pid: int | None) -> float:
    own = os.times()
    return own.user + own.system + sum(_cpu_seconds(upstreams_pid))


async def _measure_slice(
    run: _Run,
    target: _Target,
    concurrency: int,
    seconds: float,
    tokens: int,
    token_delay_s: float,
    upstreams_pid: int | None = None,
) -> None:
    # Paced streams all last about `period`. Started together, they would stay in lockstep and
    # arrive as a burst of `concurrency` requests once per period, and the TTFT p99 would time
    # the burst's queue (the last request waits for all the hand-offs before it), not a proxy
    # hop. Spread over one period, they arrive as the steady traffic of that many concurrent
    # streams does; samples count once all streams run (after the spread).
    period = max(tokens - 1, 0) * token_delay_s
    t0 = time.monotonic()
    warm_until = t0 + max(min(0.3, seconds / 4), period)
    end = warm_until + seconds

    async def worker(offset: float) -> None:
        if offset:
            await asyncio.sleep(offset)
        while True:
            start = time.monotonic()
            if start >= end:
                return
            sample = await target.one(tokens, token_delay_s)
            run.completed += 1
            if start >= warm_until:
                run.samples.append(sample)

    (user0, sys0), wait0 = _cpu_seconds(target.pid), _runqueue_wait_seconds(target.pid)
    loadgen0 = _loadgen_cpu_seconds(upstreams_pid)
    await asyncio.gather(*(worker(i * period / concurrency) for i in range(concurrency)))
    run.measured_s += time.monotonic() - warm_until
    run.wall_s += time.monotonic() - t0
    user1, sys1 = _cpu_seconds(target.pid)
    run.cpu_user_s += user1 - user0
    run.cpu_sys_s += sys1 - sys0
    run.starved_s += _runqueue_wait_seconds(target.pid) - wait0
    run.loadgen_cpu_s += _loadgen_cpu_seconds(upstreams_pid) - loadgen0


async def _measure(
    targets: list[_Target],
    concurrency: int,
    seconds: float,
    rounds: int,
    tokens: int,
    token_delay_s: float,
    upstreams_pid: int | None = None,
) -> dict[str, dict[str, float]]:
    """Each target gets `seconds` in total, in `rounds` slices taken in turn (rotating the order),
    so load that other work puts on the machine drifts over all targets alike."""
    runs = {t.name: _Run() for t in targets}
    for r in range(rounds):
        for target in targets[r % len(targets) :] + targets[: r % len(targets)]:
            await _measure_slice(
                runs[target.name], target, concurrency, seconds / rounds, tokens, token_delay_s, upstreams_pid
            )
    return {t.name: runs[t.name].stats(t.pid is not None) for t in targets}


# ---- process management ---------------------------------------------------------------------
def _spawn(args: list[str], own_session: bool = False) -> subprocess.Popen[str]:
    """`own_session`: start the child in a new session, so (with the kernel's sched_autogroup,
    on by default on desktop and many server kernels) it is its own scheduling group, as a
    proxy in its own container or systemd unit is. Left in this process's group, a proxy's
    CPU share on its pinned CPU is the group's share scaled by the proxy's part of the group's
    load - and the load generator and upstreams saturating the other CPU are most of it - so
    any other process that lands on the proxy's CPU takes most of it; the lighter the proxy,
    the smaller its part and the more it is starved.

    A child in its own session is out of reach of a Ctrl-C in the terminal and of signals to this
    process's group, so every child dies with this process (`die_with_parent`): a bench killed by
    `timeout` or `kill -9` leaves no proxy or upstream running."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=own_session,
        preexec_fn=die_with_parent,
    )


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


def _line(level: int | str, name: str, stats: dict[str, float], pid: int | None) -> str:
    cpu = (
        f"  proxy cpu {stats['proxy_cpu_ms_per_request']:.2f} ms/req"
        f" (user {stats['proxy_user_ms_per_request']:.2f}), starved {stats['proxy_cpu_starved']:.0%}"
        if pid
        else ""
    )
    cpu += f"  loadgen+upstreams cpu {stats['loadgen_cpu_ms_per_request']:.2f} ms/req"
    return (
        f"  c={level:<3} {name:<9} ttft p50/p99 {stats['ttft_p50_ms']:6.2f}/{stats['ttft_p99_ms']:6.2f} ms"
        f"  token p50/p99 {stats['event_p50_ms']:6.2f}/{stats['event_p99_ms']:6.2f} ms"
        f"  {stats['rps']:7.1f} streams/s{cpu}"
    )


async def _run_all(
    args: argparse.Namespace,
    upstreams: dict[str, list[str]],
    router: tuple[str, int],
    toy: tuple[str, int],
    upstreams_pid: int,
) -> dict[str, Any]:
    latency: dict[str, dict[str, Any]] = {}
    delay = args.token_delay_ms / 1e3
    pool = UpstreamPool(keepalive_s=_TIMEOUT_S)
    try:
        targets = [
            _Target("direct", pool, None, upstreams),
            _Target("router", pool, router[0], upstreams, router[1]),
            _Target("toy_proxy", pool, toy[0], upstreams, toy[1]),
        ]
        for target in targets:  # connection set-up and first-call costs stay out of the numbers
            await asyncio.gather(*(target.one(args.tokens, 0.0) for _ in range(8)))
        print(f"latency: streams paced at {args.token_delay_ms:g} ms/token", file=sys.stderr)
        for level in args.concurrency:
            by_target = await _measure(
                targets, level, args.seconds, args.rounds, args.tokens, delay, upstreams_pid
            )
            latency[str(level)] = by_target
            for target in targets:
                print(
                    _line(level, target.name, by_target[target.name], target.pid), file=sys.stderr, flush=True
                )
        top = max(args.concurrency)
        print(f"throughput: {top} unpaced streams", file=sys.stderr)
        throughput = await _measure(targets, top, args.seconds, args.rounds, args.tokens, 0.0, upstreams_pid)
        for target in targets:
            print(_line(top, target.name, throughput[target.name], target.pid), file=sys.stderr, flush=True)
    finally:
        await pool.close()
    return {"latency": latency, "throughput": throughput}


def _summarise(results: dict[str, Any], top: int) -> dict[str, Any]:
    latency, throughput = results["latency"], results["throughput"]
    out: dict[str, Any] = {}
    for level, by_target in latency.items():
        direct = by_target["direct"]
        for name in ("router", "toy_proxy"):
            for metric in ("ttft", "event"):
                for q in ("p50", "p99"):
                    key = f"{metric}_{q}_ms"
                    out[f"{name}_added_{key}_c{level}"] = round(by_target[name][key] - direct[key], 3)
    t = str(top)
    return {
        # headline: time to first token through the router minus the client doing the PD hand-off
        # itself, at the highest concurrency (paced streams)
        "added_p50_ms": out[f"router_added_ttft_p50_ms_c{t}"],
        "added_p99_ms": out[f"router_added_ttft_p99_ms_c{t}"],
        "added_token_p50_ms": out[f"router_added_event_p50_ms_c{t}"],
        "added_token_p99_ms": out[f"router_added_event_p99_ms_c{t}"],
        "toy_proxy_added_p99_ms": out[f"toy_proxy_added_ttft_p99_ms_c{t}"],
        "router_rps": round(throughput["router"]["rps"], 1),
        "toy_proxy_rps": round(throughput["toy_proxy"]["rps"], 1),
        "direct_rps": round(throughput["direct"]["rps"], 1),
        "router_vs_toy_throughput": round(throughput["router"]["rps"] / throughput["toy_proxy"]["rps"], 2),
        "router_cpu_ms_per_request": round(throughput["router"]["proxy_cpu_ms_per_request"], 3),
        "toy_proxy_cpu_ms_per_request": round(throughput["toy_proxy"]["proxy_cpu_ms_per_request"], 3),
        "router_capacity_rps": round(throughput["router"]["proxy_capacity_rps"], 1),
        "toy_proxy_capacity_rps": round(throughput["toy_proxy"]["proxy_capacity_rps"], 1),
        # the proxies' efficiency ratio: what the throughput ratio would be if each proxy, not the
        # load generator, were the bottleneck
        "router_vs_toy_cpu_efficiency": round(
            throughput["toy_proxy"]["proxy_cpu_ms_per_request"]
            / max(throughput["router"]["proxy_cpu_ms_per_request"], 1e-9),
            2,
        ),
        # paced streams (one event per read, as from a real decode): the per-event relay dominates
        "router_cpu_ms_per_request_paced": round(latency[t]["router"]["proxy_cpu_ms_per_request"], 3),
        "toy_proxy_cpu_ms_per_request_paced": round(latency[t]["toy_proxy"]["proxy_cpu_ms_per_request"], 3),
        "loadgen_cpu_ms_per_request": round(throughput["router"]["loadgen_cpu_ms_per_request"], 3),
        "router_cpu_starved": round(throughput["router"]["proxy_cpu_starved"], 2),
        "toy_proxy_cpu_starved": round(throughput["toy_proxy"]["proxy_cpu_starved"], 2),
        "concurrency": top,
        "cpus": os.cpu_count(),
        "pinned": results["pinned"],
        # each proxy its own scheduling group (sched_autogroup), not a share of the load generator's
        "proxies_in_own_session": results["proxies_in_own_session"],
        # other work on the machine skews latencies (each proxy hop waits for a CPU slice)
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **out,
        **results,
    }


def bench_main(args: argparse.Namespace) -> int:
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []
    plan = _plan_cpus(args.pin)
    own_cpus = os.sched_getaffinity(0) if plan else None
    if plan:  # this process (the load generator) and, inherited, the upstreams it spawns
        os.sched_setaffinity(0, plan[1])
    try:
        up = _spawn([py, "-m", "ucm.bench.fake_upstreams", "--prefill", str(args.upstreams), "--decode",
                     str(args.upstreams), "--tokens", str(args.tokens), "--model", MODEL])  # fmt: skip
        procs.append(up)
        assert up.stdout is not None
        upstreams = json.loads(up.stdout.readline())
        flags = [f for u in upstreams["prefill"] for f in ("--prefill", u)]
        flags += [f for u in upstreams["decode"] for f in ("--decode", u)]
        router = _spawn([py, "-m", "ucm", "router", "serve", "--host", "127.0.0.1", "--port", "0", "--model", MODEL,
                         "--probe-interval", "30", *flags], own_session=True)  # fmt: skip
        procs.append(router)
        toy = _spawn([py, "-m", "ucm.bench.toy_proxy", *flags], own_session=True)
        procs.append(toy)
        if plan:  # still importing, so no thread has started yet: later threads inherit this
            for proxy in (router, toy):
                os.sched_setaffinity(proxy.pid, plan[0])
        own_sessions = all(os.getsid(proxy.pid) == proxy.pid for proxy in (router, toy))
        router_url = f"http://127.0.0.1:{_wait_port(router, 'router')}"
        toy_url = f"http://127.0.0.1:{_wait_port(toy, 'toy proxy')}"
        placement = (
            f"proxy under test pinned to cpu {sorted(plan[0])}, load generator + upstreams to {sorted(plan[1])}"
            if plan
            else "not pinned"
        )
        print(
            f"PD streams of {args.tokens} token events; {args.upstreams}+{args.upstreams} fake upstreams; "
            f"{args.seconds:.1f} s per target and point in {args.rounds} interleaved slices; "
            f"{os.cpu_count()} cpus, {placement}; load average {os.getloadavg()[0]:.1f} (other work shares them)",
            file=sys.stderr,
        )
        results = run(_run_all(args, upstreams, (router_url, router.pid), (toy_url, toy.pid), up.pid))
        results["pinned"] = placement
        results["proxies_in_own_session"] = own_sessions
    finally:
        if own_cpus is not None:
            os.sched_setaffinity(0, own_cpus)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    out = _summarise(results, max(args.concurrency))
    for key, value in out.items():
        if not isinstance(value, dict) and "_added_" not in key:
            print(f"{key}: {value}")
    for level in results["latency"]:
        print(
            f"c={level}: added ttft p50/p99 router {out[f'router_added_ttft_p50_ms_c{level}']}/"
            f"{out[f'router_added_ttft_p99_ms_c{level}']} ms (toy {out[f'toy_proxy_added_ttft_p50_ms_c{level}']}/"
            f"{out[f'toy_proxy_added_ttft_p99_ms_c{level}']}); added per-token p99 router "
            f"{out[f'router_added_event_p99_ms_c{level}']} ms (toy {out[f'toy_proxy_added_event_p99_ms_c{level}']})"
        )
    if args.json:
        print(json.dumps(out))
    return 0
