"""Child processes that never outlive the process that started them.

Both the router benchmark (upstreams and proxies, some in their own session) and the e2e control
plane start children that nothing else would stop if their owner were killed: a session of its
own puts a child beyond the reach of the owner's process-group signals and of a terminal's
Ctrl-C, so only the kernel can be relied on to end it.
"""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for `subprocess.Popen`: the kernel SIGKILLs this child when the thread that
    spawned it exits, even if the owner is SIGKILLed and runs no clean-up (Linux only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
