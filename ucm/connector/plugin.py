"""vLLM general plugin (entry point `vllm.general_plugins: ucm`): registers "UCMConnector".

vLLM loads general plugins in every process at start-up, so with `ucm` installed
`--kv-transfer-config '{"kv_connector":"UCMConnector", ...}'` works without
`kv_connector_module_path`. Registration is lazy (module path + class name), so this imports
neither torch nor the connector until a connector is created.
"""

from __future__ import annotations

CONNECTOR_NAME = "UCMConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in KVConnectorFactory._registry:  # plugins may be loaded more than once
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "ucm.connector.connector", CONNECTOR_NAME)
