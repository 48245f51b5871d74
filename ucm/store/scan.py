"""Walking a file store's directories: the one place that knows how to enumerate objects.

Used by the store (index warm-up, eviction) and by `ucm store stats` / `ucm store gc`. A scan
never opens objects; it lists the shard directories and stats entries, so it is cheap on a
local disk and uses READDIRPLUS attributes on NFS. Entries that vanish while we look (another
host evicting, a writer publishing) are skipped: a scan is a snapshot, not a lock.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from ucm.store.format import SHARD_CHARS, is_temp_name, key_from_name


@dataclasses.dataclass(frozen=True)
class ObjectEntry:
    key: bytes
    path: str
    size: int
    mtime_ns: int


@dataclasses.dataclass(frozen=True)
class TempEntry:
    path: str
    size: int
    mtime_ns: int


def leaf_dirs(objects_root: str) -> Iterator[str]:
    """The shard directories (named by the first hex digits of their keys)."""
    try:
        with os.scandir(objects_root) as it:
            shards = sorted(
                e.path for e in it if len(e.name) == SHARD_CHARS and e.is_dir(follow_symlinks=False)
            )
    except FileNotFoundError:
        return
    yield from shards


def scan_leaf(leaf: str, with_stat: bool = True) -> tuple[list[ObjectEntry], list[TempEntry]]:
    """Published objects and temp files of one leaf directory."""
    objects: list[ObjectEntry] = []
    temps: list[TempEntry] = []
    try:
        it = os.scandir(leaf)
    except FileNotFoundError:
        return objects, temps
    with it:
        for entry in it:
            name = entry.name
            key = key_from_name(name)
            if key is None and not is_temp_name(name):
                continue
            size = mtime_ns = 0
            if with_stat:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                size, mtime_ns = st.st_size, st.st_mtime_ns
            if key is not None:
                objects.append(ObjectEntry(key, entry.path, size, mtime_ns))
            else:
                temps.append(TempEntry(entry.path, size, mtime_ns))
    return objects, temps


def scan_objects(objects_root: str, with_stat: bool = True) -> tuple[list[ObjectEntry], list[TempEntry]]:
    """Every published object and temp file under `objects_root`."""
    objects: list[ObjectEntry] = []
    temps: list[TempEntry] = []
    for leaf in leaf_dirs(objects_root):
        found, found_temps = scan_leaf(leaf, with_stat)
        objects.extend(found)
        temps.extend(found_temps)
    return objects, temps
