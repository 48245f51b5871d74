"""Shared values for the store tests (imported by name: tests/ has several conftest.py files)."""

from __future__ import annotations

import os

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
