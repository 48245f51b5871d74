"""`ucm bench router` runs end to end and reports its fixed-interface JSON (no timing asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ucm.bench.router import _measure_slice, _plan_cpus, _Run, _Sample


@pytest.mark.slow
def test_bench_router_reports_json_with_same_run_baselines() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "ucm", "bench", "router", "--json", "--seconds", "0.3", "--concurrency", "1", "4",
         "--tokens", "4", "--token-delay-ms", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in (
        "added_p50_ms",
        "added_p99_ms",
        "added_token_p99_ms",
        "router_rps",
        "toy_proxy_rps",
        "direct_rps",
        "router_cpu_ms_per_request",
        "toy_proxy_cpu_ms_per_request",
        "router_capacity_rps",
        "toy_proxy_capacity_rps",
        "loadgen_cpu_ms_per_request",
    ):
        assert isinstance(result[key], float | int), key
    assert result["router_rps"] > 0 and result["toy_proxy_rps"] > 0 and result["concurrency"] == 4
    assert set(result["latency"]) == {"1", "4"}
    assert set(result["latency"]["4"]) == {"direct", "router", "toy_proxy"}
    assert result["latency"]["4"]["router"]["streams"] > 0
    usable = len(os.sched_getaffinity(0))
    assert result["pinned"].startswith("proxy under test pinned") == (usable >= 2)
    # in the load generator's session the proxies shared its scheduling group and were starved
    assert result["proxies_in_own_session"] is True


def _children(pid: int) -> set[int]:
    """Direct children of `pid`, from /proc (PPid)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as status:
                    ppid = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
            except (OSError, StopIteration):
                continue
            if ppid == pid:
                found.add(int(entry))
    return found


@pytest.mark.slow
def test_bench_killed_with_sigkill_leaves_no_upstream_or_proxy_running() -> None:
    """The proxies run in sessions of their own (beyond a terminal's Ctrl-C and group signals):
    without the kernel's parent-death signal, `timeout`/`kill -9` of the bench orphaned them."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "ucm", "bench", "router", "--seconds", "30", "--concurrency", "1", "--tokens", "4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert bench.stderr is not None
        for line in bench.stderr:  # printed once the upstreams and both proxies listen
            if line.startswith("PD streams of"):
                break
        else:
            pytest.fail(f"bench exited early ({bench.wait()})")
        children = _children(bench.pid)
        assert len(children) == 3  # upstreams, router, toy proxy
    finally:
        bench.kill()
        bench.wait()
    deadline = time.monotonic() + 10
    while (
        alive := {pid for pid in children if os.path.exists(f"/proc/{pid}")}
    ) and time.monotonic() < deadline:
        time.sleep(0.1)  # killed children are re-parented to init, which reaps them
    for pid in alive:  # do not leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"left running after the bench was killed: {alive}"


def test_pinning_plan_gives_the_proxy_its_own_cpu() -> None:
    assert _plan_cpus(False) is None
    usable = os.sched_getaffinity(0)
    plan = _plan_cpus(True)
    if len(usable) < 2:
        assert plan is None
        return
    assert plan is not None
    proxy, rest = plan
    assert len(proxy) == 1 and rest and not proxy & rest and proxy | rest == usable


async def test_paced_streams_start_spread_over_one_stream_duration() -> None:
    """Streams of equal length started together stay in lockstep and arrive as one burst per
    stream duration; the slice spreads their first starts over that duration instead, and counts
    samples only once every stream runs."""
    starts: list[float] = []

    class Recorder:
        pid = None

        async def one(self, tokens: int, token_delay_s: float) -> _Sample:
            starts.append(time.monotonic())
            await asyncio.sleep((tokens - 1) * token_delay_s)
            return _Sample(0.0, 0.0, [])

    run = _Run()
    t0 = time.monotonic()
    await _measure_slice(run, Recorder(), 8, 0.1, 5, 0.01)  # type: ignore[arg-type]
    first = sorted(starts)[:8]
    period = 4 * 0.01
    # the 8 first starts step by period/8 (5 ms), not all at t0 (a stalled loop only delays them)
    assert first[-1] - t0 >= period * 7 / 8 * 0.8
    assert first[4] - t0 >= period * 4 / 8 * 0.8
    # samples count only from the end of the spread: fewer than the streams run
    assert 0 < len(run.samples) < run.completed
