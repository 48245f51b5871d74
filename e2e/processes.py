"""Child processes that never outlive their owner.

Every control-plane component runs in its own session (so its process group can be signalled as
a whole and a Ctrl-C in the terminal reaches only the Python side, which then tears down in
order) with stdout/stderr in a log file. A foreground owner (pytest) also asks the kernel to
SIGKILL the child if the owner dies without cleaning up (PR_SET_PDEATHSIG), so even `kill -9`
of pytest leaves nothing running. A background cluster (`python -m e2e.cluster up`) omits that,
records PIDs in a state file, and `down` kills them after checking that each PID still runs the
recorded binary (PIDs get reused).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ucm.process


@dataclass
class Component:
    """One running component: its process and where it logs."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: tuple[str, ...]

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.process.poll()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(name: str, argv: Sequence[str], log_dir: Path, *, die_with_parent: bool) -> Component:
    """Starts argv in its own session, logging to log_dir/<name>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ucm.process.die_with_parent if die_with_parent else None,
        )
    return Component(name, process, log_path, tuple(argv))


def pid_runs(pid: int, executable: str) -> bool:
    """True if `pid` is alive and was started from `executable` (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0", 1)[0].decode(errors="replace") == executable


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def terminate_groups(pids: Sequence[int], alive: Callable[[int], bool], grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process group (each component leads its own), then SIGKILL whatever is
    still alive after grace_s. SIGTERM first so the components flush their logs.
    Returns the PIDs that needed SIGKILL."""
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    remaining = [pid for pid in pids if alive(pid)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [pid for pid in remaining if alive(pid)]
    for pid in remaining:
        _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(alive(pid) for pid in remaining) and time.monotonic() < deadline:
        time.sleep(0.05)
    return remaining


def thread_states(pid: int) -> str:
    """What each thread of `pid` is doing, from /proc: name, state and kernel wait channel. Why a
    process does not exit: `S futex_wait` is Python waiting on a lock or a thread join; `D` is
    uninterruptible sleep in the kernel (I/O, page faults), where even SIGKILL waits."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*"), key=lambda p: int(p.name)):
        try:
            stat = (task / "stat").read_text()
            wchan = (task / "wchan").read_text().strip() or "-"
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        lines.append(f"{task.name} {name} {fields[0]} {wchan}")
    return "; ".join(lines) or "(gone)"


def process_status(pid: int) -> str:
    """The /proc/PID/status lines that say why a parent cannot reap a child: its state (a zombie
    has exited and holds no memory or files), its thread count, its parent and any tracer (a
    traced zombie is reaped by its tracer first)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "(gone)"
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return ", ".join(f"{key} {fields[key].strip()}" for key in ("State", "Threads", "PPid", "TracerPid") if key in fields)


def _reap_directly(process: subprocess.Popen[Any]) -> bool:
    """waitpid without Popen. `Popen.wait` reaps only while it holds Popen's private lock, so a
    lock held elsewhere leaves a dead child unreaped; this tells that apart from a child the
    kernel will not hand over yet (a traced zombie). True if the child was reaped here; its exit
    code is then in process.returncode."""
    try:
        pid, status = os.waitpid(process.pid, os.WNOHANG)
    except ChildProcessError:
        return False
    if pid != process.pid:
        return False
    process.returncode = os.waitstatus_to_exitcode(status)
    return True


@dataclass
class Stopped:
    """How a child process group ended under `stop_group`."""

    exit_code: int | None   # None: not reaped even after SIGKILL and kill_wait_s
    seconds: float          # from SIGTERM to exit (or to giving up)
    killed: bool            # the SIGTERM grace ran out and SIGKILL was sent
    threads: str            # thread_states when the grace ran out ("" if it was not needed)
    signalled: bool = True  # False: it had exited on its own before stop_group was called
    unreaped: str = ""      # process_status when Popen's wait did not reap it ("" if it did)
    reaped_directly: bool = False  # Popen's wait did not reap it, a plain waitpid did

    @property
    def zombie(self) -> bool:
        """Exited (nothing of it runs, it holds no memory or files) but not yet reaped."""
        return self.exit_code is None and self.unreaped.startswith("State Z")

    def describe(self) -> str:
        if not self.signalled:
            return f"had already exited ({self.exit_code})"
        how = (f"killed (SIGKILL) {self.seconds:.1f}s after SIGTERM; threads at SIGKILL: {self.threads}"
               if self.killed else f"exited ({self.exit_code}) {self.seconds:.1f}s after SIGTERM")
        if self.reaped_directly:
            return f"{how}; Popen's wait never reaped it ({self.unreaped}), a plain waitpid did"
        if self.zombie:
            killed = f"; threads at SIGKILL: {self.threads}" if self.killed else ""
            return f"exited but still not reaped {self.seconds:.0f}s after SIGTERM ({self.unreaped}){killed}"
        if self.exit_code is None:
            return (f"still running {self.seconds:.0f}s after SIGTERM and SIGKILL ({self.unreaped}); "
                    f"threads at SIGKILL: {self.threads}")
        return how


def stop_group(process: subprocess.Popen[Any], grace_s: float, kill_wait_s: float = 60.0) -> Stopped:
    """SIGTERM the process group `process` leads, SIGKILL it after grace_s, and reap it. Never
    raises on a slow exit: the report says what happened and what the threads were doing, so a
    teardown can go on and a test can decide."""
    t0 = time.monotonic()
    if process.poll() is not None:
        return Stopped(process.returncode, 0.0, False, "", signalled=False)
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
        return Stopped(process.returncode, time.monotonic() - t0, False, "")
    status = process_status(process.pid)
    if _reap_directly(process):
        return Stopped(process.returncode, time.monotonic() - t0, False, "", unreaped=status, reaped_directly=True)
    # A zombie leader did exit on SIGTERM (only reaping is left), so it is not reported as killed;
    # the rest of its group still gets SIGKILL.
    kill = not status.startswith("State Z")
    threads = thread_states(process.pid) if kill else ""
    _signal_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=kill_wait_s)
        return Stopped(process.returncode, time.monotonic() - t0, kill, threads)
    unreaped = f"{process_status(process.pid)}; threads: {thread_states(process.pid)}"
    reaped = _reap_directly(process)
    return Stopped(process.returncode, time.monotonic() - t0, kill, threads, unreaped=unreaped, reaped_directly=reaped)


def stop_components(components: Sequence[Component], grace_s: float = 5.0) -> None:
    """Stops components this process started (and reaps them, so none stays a zombie), all in
    one go. Callers that need an order call this once per tier."""

    def alive(pid: int) -> bool:
        for c in components:
            if c.pid == pid:
                return c.exited() is None
        return False

    terminate_groups([c.pid for c in components if c.exited() is None], alive, grace_s)
    for c in components:
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.process.wait(timeout=1)
