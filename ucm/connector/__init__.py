"""The UCM KV connector for vLLM 0.32 (`kv_connector_module_path: "ucm.connector"`).

`UCMConnector` is imported lazily (it needs vLLM), so `ucm.connector.config` and
`ucm.connector.heads` stay importable where vLLM and torch are not installed (the operator).
"""

from __future__ import annotations

from typing import Any

__all__ = ["UCMConnector"]


def __getattr__(name: str) -> Any:
    if name == "UCMConnector":
        from ucm.connector.connector import UCMConnector

        return UCMConnector
    raise AttributeError(f"module 'ucm.connector' has no attribute {name!r}")
