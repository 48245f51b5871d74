"""Shared fixtures of the sparse tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def clean_sparse() -> Iterator[None]:
    """No active sparse algorithm and no patched vLLM attention before or after a test."""
    from ucm.sparse import shutdown_sparse, vllm_patch

    shutdown_sparse()
    yield
    shutdown_sparse()
    vllm_patch.uninstall_attention_hooks()
