"""The UCM KV connector for vLLM 0.32 (`kv_connector_module_path: "ucm.connector"`).

Importing this package imports vLLM; `ucm.connector.config` and `ucm.connector.layouts` do not.
"""

from ucm.connector.connector import UCMConnector

__all__ = ["UCMConnector"]
