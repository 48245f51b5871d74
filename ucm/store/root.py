"""Setting up a store directory: the marker that says it is one, its sub-directories, and
checks that fail early (a foreign directory, another layout version, no O_DIRECT).

Why a marker: pointing a store at the wrong directory (a home directory, another product's
cache) must fail at start-up with a clear message instead of filling or evicting it.
"""

from __future__ import annotations

import json
import os
import time

from ucm.store.base import StoreError
from ucm.store.fileio import Publisher, unlink_quietly
from ucm.store.format import (
    MARKER_FORMAT,
    MARKER_NAME,
    MARKER_VERSION,
    OBJECTS_DIR,
    QUARANTINE_DIR,
    SHARD_NAMES,
    is_temp_name,
    temp_name,
)

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def prepare_root(root: str, *, direct: bool) -> tuple[str, OSError] | None:
    """Create or validate the store directory. Raises StoreError for a path that cannot be a
    store; returns (path, error) for a write that failed (the store then refuses dumps but
    serves loads, e.g. on a read-only filesystem), else None. Safe for any number of processes
    (on any number of hosts) opening a brand-new directory at the same moment."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise StoreError(f"store path {root} exists and is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create store directory {root}: {exc.strerror}") from exc
    marker = os.path.join(root, MARKER_NAME)
    failure = _ensure_marker(root, marker)
    for directory in (os.path.join(root, OBJECTS_DIR), os.path.join(root, QUARANTINE_DIR)):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            failure = failure or (directory, exc)
    if direct:
        _probe_direct(root, marker)
    return failure


# Rounds of "read the marker, else check the directory is empty and publish one". A round
# only repeats when the marker appeared (another opener) or vanished (someone deleting the
# store) since the last look; the back-off gives NFS attribute caches time to catch up.
_MARKER_ROUNDS = 8
_MARKER_BACKOFF_S = 0.005


def _ensure_marker(root: str, marker: str) -> tuple[str, OSError] | None:
    """Check the marker, creating it first if this is a new store directory.

    Why a loop instead of check-then-create: openers of a new directory race. Any other
    opener may publish the marker between any two of our steps, so every step that finds the
    directory changed starts over from reading the marker; a marker is only ever published
    complete (temp file + link/rename), so whatever we read is a whole one. We also read
    back the marker we published ourselves: with a plain-rename fallback the last opener
    wins, and with NFS a retransmitted LINK can report EEXIST for our own link."""
    for attempt in range(_MARKER_ROUNDS):
        meta = _read_marker(marker)
        if meta is not None:
            _check_marker(marker, meta)
            return None
        if _marker_listed(root):
            _back_off(attempt)  # published since our read: visible to the next one
            continue
        try:
            _publish_marker(root, marker)
        except OSError as exc:
            return marker, exc  # e.g. a read-only filesystem: loads only (of an empty store)
    raise StoreError(
        f"{marker}: the store marker kept appearing and vanishing while opening {root}; "
        "is another process deleting the store directory?"
    )


def _back_off(attempt: int) -> None:
    time.sleep(_MARKER_BACKOFF_S * (attempt + 1))


def _read_marker(marker: str) -> object | None:
    """The marker's parsed JSON, or None if there is no marker (yet)."""
    try:
        with open(marker, encoding="utf-8") as f:
            meta: object = json.load(f)
            return meta
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{marker}: unreadable store marker ({exc})") from exc


def _check_marker(marker: str, meta: object) -> None:
    if not isinstance(meta, dict) or meta.get("format") != MARKER_FORMAT:
        raise StoreError(f"{marker}: not a UCM file store marker (expected format {MARKER_FORMAT!r})")
    if meta.get("version") != MARKER_VERSION:
        raise StoreError(
            f"{marker}: store layout version {meta.get('version')!r}, this UCM reads {MARKER_VERSION}"
        )


def _marker_listed(root: str) -> bool:
    """Whether the listing shows a marker; raises StoreError for a foreign directory.

    Nothing but our own kinds of entries may be there without a marker: the sub-directories
    (a store whose marker could not be written), other openers' temp files (the marker being
    created) and NFS "silly rename" files (`.nfs*`, an unlinked file someone still holds open).
    A marker in the listing means another opener published it after we looked for it."""
    names = set(os.listdir(root))
    if MARKER_NAME in names:
        return True
    foreign = sorted(
        n for n in names - {OBJECTS_DIR, QUARANTINE_DIR} if not is_temp_name(n) and not n.startswith(".nfs")
    )
    if foreign:
        raise StoreError(
            f"store path {root} is not empty and has no {MARKER_NAME} "
            f"(found {', '.join(foreign[:5])}); refusing to use a foreign directory as a store"
        )
    return False


def _publish_marker(root: str, marker: str) -> bool:
    """Write a marker to a temp file of our own and publish it unless one exists (first
    writer wins: renameat2(RENAME_NOREPLACE) where the filesystem has it, else link(), which
    is atomic on NFS too; a plain rename only where the filesystem has neither). True if ours
    was published. The temp file is fsynced first: a marker published empty by a host crash
    would block the store for good.
    Plain "w", not O_EXCL: the temp name is unique to us, and O_EXCL is not reliable on NFSv2
    (a retransmitted CREATE fails with EEXIST)."""
    tmp = os.path.join(root, temp_name("marker"))
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": MARKER_FORMAT, "version": MARKER_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        return Publisher().publish(tmp, marker)
    finally:
        unlink_quietly(tmp)  # the name is ours alone: only our own leftover can be there


def _probe_direct(root: str, marker: str) -> None:
    if not os.path.exists(marker):
        return  # an empty read-only directory: nothing will ever be read or written
    try:
        os.close(os.open(marker, os.O_RDONLY | _O_DIRECT))
    except OSError as exc:
        raise StoreError(
            f"direct=True but {root} does not support O_DIRECT ({exc.strerror}); use direct=False"
        ) from exc


def create_shards(objects_root: str) -> None:
    """Create the shard directories that do not exist yet, so writes need no mkdir.
    Best effort: a dump creates its shard itself if this has not (or could not)."""
    try:
        existing = set(os.listdir(objects_root))
    except OSError:
        return
    for name in SHARD_NAMES:
        if name not in existing:
            try:
                os.mkdir(os.path.join(objects_root, name))
            except FileExistsError:
                pass
            except OSError:
                return
