"""Store-wide maintenance that needs no salt: LRU eviction, garbage collection, a usage report.

Recency is the object file's mtime: set when the object is published and bumped by readers
(`os.utime` on the open file, at most once per `touch_interval_s`). Why mtime: it is the one
timestamp that NFS keeps coherently across hosts (atime is usually off or lazy, and flock or
shared memory do not work there). Eviction is a sorted scan: list every object with its
size and mtime, remove the oldest until usage is under the target. That is exact LRU (up to
the touch interval and clock skew between hosts), costs one directory walk, and runs only when
usage crosses the capacity, evicting down to a low watermark so walks are amortised over
many dumps. Sampling (pick K random objects, evict the oldest) would avoid the walk but with
NFS's per-directory listing cost it saves little and evicts less precisely.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

from ucm.store.format import HEADER_SIZE, MARKER_NAME, OBJECTS_DIR, QUARANTINE_DIR, HeaderError, decode_header
from ucm.store.scan import ObjectEntry, TempEntry, scan_objects


def evict_lru(entries: Iterable[ObjectEntry], current_bytes: int, target_bytes: int) -> list[ObjectEntry]:
    """Remove the least recently used objects until `current_bytes` <= `target_bytes`.

    Returns the objects actually removed (an object already gone is not counted)."""
    removed: list[ObjectEntry] = []
    for entry in sorted(entries, key=lambda e: (e.mtime_ns, e.path)):
        if current_bytes <= target_bytes:
            break
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            current_bytes -= entry.size  # someone else removed it: the space is free anyway
            continue
        current_bytes -= entry.size
        removed.append(entry)
    return removed


def remove_stale_temps(temps: Iterable[TempEntry], max_age_s: float, now_ns: int | None = None) -> int:
    """Remove temp files older than `max_age_s` (left by killed writers); a younger one may be
    a write in progress on another host."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    removed = 0
    for temp in temps:
        if now_ns - temp.mtime_ns >= max_age_s * 1e9:
            try:
                os.unlink(temp.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _quarantine_entries(root: str) -> list[TempEntry]:
    out: list[TempEntry] = []
    try:
        with os.scandir(os.path.join(root, QUARANTINE_DIR)) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append(TempEntry(entry.path, st.st_size, st.st_mtime_ns))
    except FileNotFoundError:
        pass
    return out


def check_store_dir(path: str) -> str:
    """The absolute root of an existing store, or ValueError saying what is wrong with `path`."""
    root = os.path.abspath(path)
    if not os.path.exists(root):
        raise ValueError(f"{root}: no such directory")
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a directory")
    if not os.path.exists(os.path.join(root, MARKER_NAME)):
        raise ValueError(f"{root}: not a UCM store (no {MARKER_NAME})")
    return root


@dataclasses.dataclass
class StoreReport:
    path: str
    blocks: int
    bytes: int
    oldest_mtime: float | None
    newest_mtime: float | None
    temp_files: int
    temp_bytes: int
    quarantined: int
    sampled: int
    corrupt_in_sample: int
    salts: dict[str, int]  # salt hex -> objects in the sample
    layouts: dict[str, int]  # layout description -> objects in the sample

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def store_report(path: str, sample: int = 1000) -> StoreReport:
    """Walk the store and read the headers of up to `sample` objects (salts and layouts seen)."""
    root = check_store_dir(path)
    objects, temps = scan_objects(os.path.join(root, OBJECTS_DIR))
    salts: dict[str, int] = {}
    layouts: dict[str, int] = {}
    corrupt = sampled = 0
    step = max(1, len(objects) // sample) if sample > 0 else 0
    for entry in objects[::step] if step else []:
        sampled += 1
        try:
            with open(entry.path, "rb") as f:
                header = decode_header(f.read(HEADER_SIZE))
            if header.key != entry.key or entry.size < HEADER_SIZE + header.payload_len:
                raise HeaderError("key or length mismatch")
        except (OSError, HeaderError):
            corrupt += 1
            continue
        salts[header.salt.hex()] = salts.get(header.salt.hex(), 0) + 1
        layouts[header.layout] = layouts.get(header.layout, 0) + 1
    mtimes = [o.mtime_ns for o in objects]
    return StoreReport(
        path=root,
        blocks=len(objects),
        bytes=sum(o.size for o in objects),
        oldest_mtime=min(mtimes) / 1e9 if mtimes else None,
        newest_mtime=max(mtimes) / 1e9 if mtimes else None,
        temp_files=len(temps),
        temp_bytes=sum(t.size for t in temps),
        quarantined=len(_quarantine_entries(root)),
        sampled=sampled,
        corrupt_in_sample=corrupt,
        salts=salts,
        layouts=layouts,
    )


@dataclasses.dataclass
class GcResult:
    evicted_blocks: int
    evicted_bytes: int
    remaining_bytes: int
    temps_removed: int
    quarantine_removed: int

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def collect_garbage(path: str, max_bytes: int | None, temp_max_age_s: float = 3600.0) -> GcResult:
    """Evict LRU objects down to `max_bytes` (None: no eviction) and remove temp files and
    quarantined objects older than `temp_max_age_s`."""
    root = check_store_dir(path)
    objects, temps = scan_objects(os.path.join(root, OBJECTS_DIR))
    total = sum(o.size for o in objects)
    removed = evict_lru(objects, total, max_bytes) if max_bytes is not None else []
    evicted_bytes = sum(o.size for o in removed)
    return GcResult(
        evicted_blocks=len(removed),
        evicted_bytes=evicted_bytes,
        remaining_bytes=total - evicted_bytes,
        temps_removed=remove_stale_temps(temps, temp_max_age_s),
        quarantine_removed=remove_stale_temps(_quarantine_entries(root), temp_max_age_s),
    )
