"""Where the control-plane binaries live.

e2e/build/build-binaries.sh builds them into a cache directory keyed by the versions pinned in
e2e/build/versions.env; this module computes the same directory from the same file, so the pins
exist in exactly one place and Python never guesses a path.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILD_DIR = Path(__file__).resolve().parent / "build"
VERSIONS_FILE = BUILD_DIR / "versions.env"
BUILD_SCRIPT = BUILD_DIR / "build-binaries.sh"
# Every binary the harness and the e2e tests run.
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd", "kwok", "helm")
_KEYS = ("KUBERNETES_VERSION", "ETCD_VERSION", "KWOK_VERSION", "HELM_VERSION")


class BinariesMissing(RuntimeError):
    """The cache directory lacks a binary: the user must run `make bins` first."""


def versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parses versions.env (KEY=VALUE lines, # comments) and checks that every pin is there."""
    found: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        found[key] = value.strip().strip("\"'")
    missing = [k for k in _KEYS if not found.get(k)]
    if missing:
        raise ValueError(f"{path}: missing version pin(s) {', '.join(missing)}")
    return found


def cache_key(pins: dict[str, str]) -> str:
    """The cache directory name; must match KEY= in build-binaries.sh."""
    return (
        f"k8s-{pins['KUBERNETES_VERSION']}_etcd-{pins['ETCD_VERSION']}"
        f"_kwok-{pins['KWOK_VERSION']}_helm-{pins['HELM_VERSION']}"
    )


def cache_root() -> Path:
    """${UCM_BIN_CACHE:-$HOME/.cache/ucm/bin}: outside the clone, so fresh clones reuse it."""
    configured = os.environ.get("UCM_BIN_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "ucm" / "bin"


def bin_dir(*, require: bool = False) -> Path:
    """The directory holding the binaries for the pinned versions.

    With require=True, raises BinariesMissing naming the absent binaries and the command that
    builds them, instead of letting a later subprocess fail with a bare ENOENT.
    """
    directory = cache_root() / cache_key(versions())
    if require:
        absent = [name for name in BINARIES if not os.access(directory / name, os.X_OK)]
        if absent:
            raise BinariesMissing(
                f"control-plane binaries missing in {directory}: {', '.join(absent)}; "
                f"build them with `make bins` (runs {BUILD_SCRIPT.relative_to(BUILD_DIR.parent.parent)})"
            )
    return directory
