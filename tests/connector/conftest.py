"""Connector tests share `ucm_connector_harness` and `hf_glue` from this directory; put it on
sys.path explicitly so they import the same way under any pytest import mode."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
