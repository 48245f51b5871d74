"""Fixtures for the store tests: a store factory over a per-test directory."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from store_helpers import SALT

from ucm.store import FileStore


@pytest.fixture
def store_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "store"


@pytest.fixture
def make_store(store_dir: pathlib.Path) -> Iterator[Callable[..., FileStore]]:
    opened: list[FileStore] = []

    def make(**options: Any) -> FileStore:
        options.setdefault("salt", SALT)
        options.setdefault("io_threads", 4)
        options.setdefault("prepare_shards", False)  # 4,096 mkdirs per test store: covered once, separately
        path = options.pop("path", store_dir)
        store = FileStore(path, **options)
        store.index_ready.wait(10)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
