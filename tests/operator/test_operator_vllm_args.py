"""The worker command line goes through vLLM 0.32's own `vllm serve` parser and engine-args
conversion: flags exist, values parse, the KV transfer config becomes a KVTransferConfig."""

from __future__ import annotations

import contextlib
import io
import itertools
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


# --- our reading of vLLM arguments (ucm_operator.vllm_args) against vLLM's own parser ----------

# dest -> values to spell; owned, KV-relevant and ordinary flags of each kind (value, list, bool).
VALUES: dict[str, tuple[str, ...]] = {
    "kv_cache_dtype": ("fp8", "fp8_e5m2"),
    "quantization": ("awq", "None"),
    "tokenizer": ("org/tok",),
    "tokenizer_mode": ("slow",),
    "tokenizer_revision": ("v2",),
    "code_revision": ("abc",),
    "hf_overrides": ('{"a": 1}', '{"rope_scaling": {"type": "yarn", "factor": 4}}'),
    "pipeline_parallel_size": ("2",),
    "block_size": ("32",),
    "tensor_parallel_size": ("4",),
    "data_parallel_size": ("2",),
    "served_model_name": ("x",),
    "max_model_len": ("4096", "8k"),
    "max_num_seqs": ("8", "-1"),
    "gpu_memory_utilization": ("0.5",),
}
BOOLEANS = ("enforce_eager", "trust_remote_code", "enable_prefix_caching", "disable_log_stats")
# A full JSON value each dotted flag may also be given (a valid one: vLLM converts every occurrence).
FULL_JSON = {"hf_overrides": '{"a": 2, "b": 3}', "kv_transfer_config": '{"kv_connector": "X", "kv_role": "kv_producer"}',
             "compilation_config": '{"mode": 1}'}
DOTTED = (("hf_overrides", "a", "1"), ("hf_overrides", "rope_scaling.factor", "4"), ("hf_overrides", "n", "80g"),
          ("hf_overrides", "s", "text"), ("hf_overrides", "lst+", "a,b"), ("kv_transfer_config", "kv_role", "kv_both"),
          ("compilation_config", "mode", "0"))


def _names(dest: str) -> list[str]:
    """Every spelling of the option names of `dest`: as declared, with underscores, half
    underscored, each unambiguous prefix, and the short aliases."""
    from ucm_operator.vllm_flags import OPTIONS

    declared = [o for o, (d, _k) in OPTIONS.items() if d == dest]
    names: list[str] = []
    for option in declared:
        names.append(option)
        if option.startswith("--"):
            body = option[2:]
            names += ["--" + body.replace("-", "_"), "--" + body.replace("-", "_", 1)]
            for cut in range(3, len(option)):
                prefix = option[:cut]
                if sum(o.startswith(prefix) for o in OPTIONS) == 1 or cut == len(option) - 1:
                    names.append(prefix)   # unique prefixes, and the longest one even when ambiguous
    return list(dict.fromkeys(names))


def corpus() -> list[list[str]]:
    """Command-line tails: every spelling of every flag above with each value, `=` or separate;
    booleans with their negations; dotted sub-keys alone, after a full JSON value and with
    underscores; repeats (last wins); and mistakes vLLM exits on."""
    cases: list[list[str]] = []
    for dest, values in VALUES.items():
        for name, value in itertools.product(_names(dest), values):
            cases += [[name, value], [f"{name}={value}"], ["--enforce-eager", name, value, "--max-num-seqs", "4"]]
        first, second = (values * 2)[:2]
        cases.append([f"{_names(dest)[0]}={first}", _names(dest)[-1], second])
    for dest in BOOLEANS:
        for name in _names(dest):
            cases += [[name], [name, "--max-num-seqs", "3"], [f"{name}=1"]]
    for dest, key, value in DOTTED:
        for name in _names(dest)[:3]:
            cases += [[f"{name}.{key}", value], [f"{name}.{key}={value}"],
                      [name, FULL_JSON[dest], f"{name}.{key}={value}"], [f"{name}.{key}={value}", name, "{}"]]
    cases += [["--kv-cache-dtypo", "fp8"], ["--kv-cache-dtype"], ["stray"], ["--max-num-seqs", "1", "2"], ["--"],
              ["-O3"], ["-O", "2"], ["-tp2"], ["-qawq"], ["--hf-overrides.a"], ["--help"]]
    return cases


def _comparable(value: Any) -> Any:
    """KVTransferConfig gets a random engine id per parse; compare what the operator reads."""
    if hasattr(value, "kv_role"):
        return (value.kv_connector, value.kv_role, value.kv_connector_extra_config)
    return value


def test_option_table_is_vllms() -> None:
    pytest.importorskip("vllm")
    from ucm_operator.vllm_flags import DEFAULTS, OPTIONS
    from vllm_parser import defaults, option_table, serve_parser

    sub = serve_parser()[1]
    regenerate = "regenerate: python tests/operator/vllm_parser.py > operator/ucm_operator/vllm_flags.py"
    assert option_table(sub) == OPTIONS, regenerate
    assert defaults(sub) == DEFAULTS, regenerate


def test_our_reading_agrees_with_vllm_on_every_spelling(hetero: dict[str, Any]) -> None:
    pytest.importorskip("vllm")
    from ucm_operator.build_workers import operator_args
    from ucm_operator.vllm_args import parse
    from vllm_parser import serve_parser

    root, sub = serve_parser()
    actions = {a.dest: a for a in sub._actions}
    spec = parse_cluster(hetero)
    base = operator_args(spec, spec.decode[0])
    compared = [*VALUES, *BOOLEANS, "hf_overrides", "kv_transfer_config", "compilation_config", "optimization_level",
                "model_tag"]
    cases = corpus()
    assert len(cases) > 500
    disagreements = []
    for extra in cases:
        ours = parse(base, extra)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                theirs = root.parse_args(["serve", *base, *extra])
        except (SystemExit, IndexError, ValueError) as exc:
            if ours.error is None:
                disagreements.append(f"{extra}: vLLM exits ({exc!r}), we read {ours.values}")
            continue
        if ours.error is not None:
            disagreements.append(f"{extra}: vLLM parses it, we say {ours.error}")
            continue
        for dest in compared:
            action = actions[dest]
            if dest in ours.values:
                value = ours.values[dest]
                if isinstance(value, list) and action.type is not None:
                    value = [action.type(v) for v in value]
                elif isinstance(value, str) and action.type is not None:
                    value = action.type(value)
            else:
                value = action.default
            if _comparable(value) != _comparable(getattr(theirs, dest)):
                disagreements.append(f"{extra}: {dest} is {getattr(theirs, dest)!r} for vLLM, {value!r} for us")
    assert disagreements == [], f"{len(disagreements)} of {len(cases)} disagree:\n" + "\n".join(disagreements[:20])
