"""`spec.window` (ReRoPE): from the UCMCluster to every pool's connector config and command line."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
from operator_helpers import load_example
from ucm_operator.build_workers import vllm_args
from ucm_operator.meta import connector_extra_config, revision
from ucm_operator.spec import SpecError, parse_cluster


@pytest.fixture
def body() -> dict[str, Any]:
    return load_example()


def test_window_reaches_every_pools_connector_config_and_rolls_them(body: dict[str, Any]) -> None:
    plain = parse_cluster(body)
    body["spec"]["window"] = {"window": 4096, "leak": 16, "logScale": True, "trainedLength": 8192}
    spec = parse_cluster(body)
    extra = connector_extra_config(spec)
    assert extra["ucm_window_config"] == {"window": 4096, "leak": 16.0, "log_scale": True, "trained_length": 8192}
    assert "ucm_window_config" not in connector_extra_config(plain)
    assert revision(spec) != revision(plain)
    # the connector accepts exactly what the operator writes
    from ucm.connector.config import parse_extra_config

    assert parse_extra_config(extra, default_model_id="m").ucm_window_config == extra["ucm_window_config"]


def test_with_max_model_len_the_position_table_is_extended_in_every_pool(body: dict[str, Any]) -> None:
    body["spec"]["window"] = {"window": 4096}
    body["spec"]["engine"]["maxModelLen"] = 32768
    spec = parse_cluster(body)
    for pool in spec.pools:
        args = vllm_args(spec, pool)
        assert json.loads(args[args.index("--hf-overrides") + 1]) == {"max_position_embeddings": 32768}
    body["spec"].pop("window")
    assert "--hf-overrides" not in vllm_args(parse_cluster(body), parse_cluster(body).pools[0])


@pytest.mark.parametrize(("window", "field"), [
    ({}, "spec.window.window"),
    ({"window": 0}, "spec.window.window"),
    ({"window": "4k"}, "spec.window.window"),
    ({"window": 512, "leak": 1}, "spec.window.leak"),
    ({"window": 512, "leak": True}, "spec.window.leak"),
    ({"window": 512, "logScale": True}, "spec.window.trainedLength"),
    ({"window": 512, "trainedLength": 1}, "spec.window.trainedLength"),
    ({"window": 512, "size": 3}, "spec.window.size"),
])
def test_window_errors_name_the_field(body: dict[str, Any], window: dict[str, Any], field: str) -> None:
    body["spec"]["window"] = window
    with pytest.raises(SpecError) as err:
        parse_cluster(body)
    assert err.value.field == field


def test_window_with_sparse_is_refused(body: dict[str, Any]) -> None:
    body["spec"]["window"] = {"window": 512}
    body["spec"]["sparse"] = {"keepRatio": 0.25}
    with pytest.raises(SpecError) as err:
        parse_cluster(body)
    assert err.value.field == "spec.window"


@pytest.mark.parametrize(("window", "where"), [
    ({"leak": 2}, "spec/window"),  # window is required
    ({"window": 0}, "spec/window/window"),
    ({"window": 8, "leak": 1}, "spec/window/leak"),
])
def test_crd_schema_refuses_bad_windows(body: dict[str, Any], window: dict[str, Any], where: str) -> None:
    from test_operator_crd import schema, to_jsonschema

    doc = copy.deepcopy(body)
    doc["spec"]["window"] = window
    validator = jsonschema.Draft7Validator(to_jsonschema(schema()))
    paths = ["/".join(map(str, e.path)) for e in validator.iter_errors(doc)]
    assert where in paths, paths
