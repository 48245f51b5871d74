"""The worker command line goes through vLLM 0.32's own `vllm serve` parser and engine-args
conversion: flags exist, values parse, the KV transfer config becomes a KVTransferConfig."""

from __future__ import annotations

from typing import Any

import pytest
from ucm_operator.build_workers import vllm_args
from ucm_operator.spec import parse_cluster


def test_vllm_parses_the_worker_command_line(hetero: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    serve = pytest.importorskip("vllm.entrypoints.cli.serve")
    import vllm.engine.arg_utils as arg_utils
    import vllm.platforms
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms.cpu import CpuPlatform

    # No GPU here: argument defaults need a device. vLLM resolves its platform once per process,
    # so set it explicitly rather than through VLLM_TARGET_DEVICE, which is too late if another
    # test resolved it first.
    monkeypatch.setattr(vllm.platforms, "_current_platform", CpuPlatform())
    # With HF_HUB_OFFLINE=1 (as in `make test`) vLLM swaps the model id for a local snapshot path;
    # the weights cannot exist here, and the test is about the command line, not the download.
    monkeypatch.setattr(arg_utils, "get_model_path", lambda model, revision=None: model)
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    root = FlexibleArgumentParser()
    command = serve.ServeSubcommand()
    command.subparser_init(root.add_subparsers(dest="subcommand"))
    spec = parse_cluster(hetero)
    for pool, role, tp in ((spec.prefill[0], "kv_producer", 2), (spec.decode[0], "kv_consumer", 1)):
        args = root.parse_args(["serve", *vllm_args(spec, pool)])
        command.validate(args)
        args.model = args.model_tag
        engine = AsyncEngineArgs.from_cli_args(args)
        assert (engine.model, engine.revision, engine.served_model_name) == (
            "meta-llama/Llama-3.1-8B-Instruct", "main", ["llama-3.1-8b"])
        assert (engine.block_size, engine.dtype, engine.max_model_len, engine.tensor_parallel_size) == (
            16, "bfloat16", 32768, tp)
        assert engine.gpu_memory_utilization == 0.90
        kv = engine.kv_transfer_config
        assert kv is not None and kv.kv_connector == "UCMConnector" and kv.kv_role == role
        assert kv.kv_connector_module_path == "ucm.connector"
        assert kv.kv_connector_extra_config["store_path"] == "/mnt/ucm"
        assert kv.kv_connector_extra_config["max_tp_size"] == 2  # the prefill pool's TP, in every pool
        assert (args.host, args.port) == ("0.0.0.0", 8000)
