"""vLLM general plugin (entry point `vllm.general_plugins: ucm`): registers "UCMConnector".

vLLM loads general plugins in every process at start-up, so with `ucm` installed
`--kv-transfer-config '{"kv_connector":"UCMConnector", ...}'` works without
`kv_connector_module_path`. Registration is lazy (module path + class name): the connector is not
imported until one is created. The plugin also wraps vLLM's start-up KV memory check, which runs
in the engine core before any connector exists, so that a pool smaller than `max_model_len` starts
when sparse offload serves such requests (`ucm.sparse.vllm_patch.install_memory_check`; vLLM's own
check otherwise).
"""

from __future__ import annotations

CONNECTOR_NAME = "UCMConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in KVConnectorFactory._registry:  # plugins may be loaded more than once
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "ucm.connector.connector", CONNECTOR_NAME)
    import vllm

    from ucm.sparse import vllm_patch

    if vllm.__version__ == vllm_patch.SUPPORTED_VLLM:  # other versions refuse sparse configs anyway
        vllm_patch.install_memory_check()
