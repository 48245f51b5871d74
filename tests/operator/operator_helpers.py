"""Shared helpers for the operator's unit tests (no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CRD_PATH = ROOT / "crds" / "ucm.dev_ucmclusters.yaml"
RBAC_PATH = ROOT / "charts" / "ucm" / "files" / "operator-rbac.yaml"


def load_example(name: str = "ucmcluster-heterogeneous.yaml") -> dict[str, Any]:
    """An example as the API server would return it (namespace, uid and generation set)."""
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    body["metadata"].update(namespace="ns1", uid="uid-1", generation=1)
    return body
