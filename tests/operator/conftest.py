"""Fixtures for the operator's unit tests (no cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from operator_helpers import load_example


@pytest.fixture
def hetero() -> dict[str, Any]:
    """The heterogeneous example as the API server would return it."""
    return load_example()
