"""Setting up a store directory: the marker that says it is one, its sub-directories, and
checks that fail early (a foreign directory, another format version, no O_DIRECT).

Why a marker: pointing a store at the wrong directory (a home directory, another product's
cache) must fail at start-up with a clear message instead of filling or evicting it.
"""

from __future__ import annotations

import json
import os

from ucm.store.base import StoreError
from ucm.store.fileio import NO_LINK_ERRNOS
from ucm.store.format import (
    FORMAT_VERSION,
    MARKER_FORMAT,
    MARKER_NAME,
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
    serves loads, e.g. on a read-only filesystem), else None."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise StoreError(f"store path {root} exists and is not a directory")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create store directory {root}: {exc.strerror}") from exc
    failure: tuple[str, OSError] | None = None
    marker = os.path.join(root, MARKER_NAME)
    if os.path.exists(marker):
        _check_marker(marker)
    else:
        names = set(os.listdir(root)) - {OBJECTS_DIR, QUARANTINE_DIR}
        foreign = sorted(n for n in names if not is_temp_name(n))  # another process creating it
        if foreign:
            raise StoreError(
                f"store path {root} is not empty and has no {MARKER_NAME} "
                f"(found {', '.join(foreign[:5])}); refusing to use a foreign directory as a store"
            )
        try:
            _write_marker(root, marker)
        except OSError as exc:
            failure = (marker, exc)
    for directory in (os.path.join(root, OBJECTS_DIR), os.path.join(root, QUARANTINE_DIR)):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            failure = failure or (directory, exc)
    if direct:
        _probe_direct(root, marker)
    return failure


def _check_marker(marker: str) -> None:
    try:
        with open(marker, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{marker}: unreadable store marker ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != MARKER_FORMAT:
        raise StoreError(f"{marker}: not a UCM file store marker (expected format {MARKER_FORMAT!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise StoreError(
            f"{marker}: store format version {meta.get('version')!r}, this UCM reads {FORMAT_VERSION}"
        )


def _write_marker(root: str, marker: str) -> None:
    tmp = os.path.join(root, temp_name("marker"))
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": MARKER_FORMAT, "version": FORMAT_VERSION}, f)
    try:
        os.link(tmp, marker)
    except FileExistsError:
        pass  # another process created the store at the same moment
    except OSError as exc:
        if exc.errno not in NO_LINK_ERRNOS:
            raise
        os.rename(tmp, marker)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
