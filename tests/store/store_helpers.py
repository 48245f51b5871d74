"""Shared values for the store tests (imported by name: tests/ has several conftest.py files)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import numpy as np

from ucm.store import BlockLayout

SALT = bytes(range(16))
LAYOUT = BlockLayout(dtype="bfloat16", shape=(2, 4, 1000), itemsize=2)  # 16,000 bytes: not 4096-aligned


def random_keys(n: int) -> list[bytes]:
    return [os.urandom(20) for _ in range(n)]


def payload_for(key: bytes, nbytes: int = LAYOUT.nbytes) -> np.ndarray:
    """A payload that is a pure function of the key, so any process can verify what it loads."""
    seed = int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


# -- writers killed with SIGKILL (a crash leaves no chance to clean up) --------------------------


def forked(child: Callable[[], object]) -> int:
    """Run `child` in a forked process and return its pid. The child exits 0 if `child`
    returns and 1 if it raises; `os._exit` so it never runs the parent's pytest machinery."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def kill_and_reap(pid: int) -> bool:
    """SIGKILL a forked child and reap it; True if the kill ended it (not an earlier exit)."""
    os.kill(pid, signal.SIGKILL)  # an exited but unreaped child is a zombie: the kill still succeeds
    _, status = os.waitpid(pid, 0)
    return killed_by_sigkill(status)


def die_now() -> None:
    """SIGKILL ourselves: the process stops between two instructions, as in a crash."""
    os.kill(os.getpid(), signal.SIGKILL)
