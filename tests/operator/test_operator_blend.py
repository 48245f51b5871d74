"""`spec.blend` (cache blend): from the UCMCluster to every pool's connector config."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
from operator_helpers import load_example
from ucm_operator.meta import connector_extra_config, revision
from ucm_operator.spec import SpecError, parse_cluster


@pytest.fixture
def body() -> dict[str, Any]:
    return load_example()


def test_blend_reaches_every_pools_connector_config_and_rolls_them(body: dict[str, Any]) -> None:
    plain = parse_cluster(body)
    body["spec"]["blend"] = {"separatorIds": [198, 19], "recomputeRatio": 0.3, "checkLayer": 2}
    spec = parse_cluster(body)
    extra = connector_extra_config(spec)
    assert extra["ucm_blend_config"] == {"separator_ids": [198, 19], "recompute_ratio": 0.3, "check_layer": 2}
    assert "ucm_blend_config" not in connector_extra_config(plain)
    assert revision(spec) != revision(plain)
    from ucm.connector.config import parse_extra_config  # the connector accepts what the operator writes

    assert parse_extra_config(extra, default_model_id="m").ucm_blend_config == extra["ucm_blend_config"]
    body["spec"]["blend"] = {"separatorIds": [5]}
    assert connector_extra_config(parse_cluster(body))["ucm_blend_config"] == {"separator_ids": [5]}


@pytest.mark.parametrize(("blend", "field"), [
    ({}, "spec.blend.separatorIds"),
    ({"separatorIds": []}, "spec.blend.separatorIds"),
    ({"separatorIds": ["#"]}, "spec.blend.separatorIds"),
    ({"separatorIds": [1], "recomputeRatio": 2}, "spec.blend.recomputeRatio"),
    ({"separatorIds": [1], "recomputeRatio": True}, "spec.blend.recomputeRatio"),
    ({"separatorIds": [1], "checkLayer": -1}, "spec.blend.checkLayer"),
    ({"separatorIds": [1], "ratio": 0.1}, "spec.blend.ratio"),
])
def test_blend_errors_name_the_field(body: dict[str, Any], blend: dict[str, Any], field: str) -> None:
    body["spec"]["blend"] = blend
    with pytest.raises(SpecError) as err:
        parse_cluster(body)
    assert err.value.field == field


@pytest.mark.parametrize("other", [{"window": {"window": 512}}, {"sparse": {"keepRatio": 0.25}}])
def test_blend_beside_another_attention_algorithm_is_refused(body: dict[str, Any], other: dict[str, Any]) -> None:
    body["spec"].update(other, blend={"separatorIds": [1]})
    with pytest.raises(SpecError) as err:
        parse_cluster(body)
    assert err.value.field == "spec.blend"


@pytest.mark.parametrize(("blend", "where"), [
    ({"recomputeRatio": 0.1}, "spec/blend"),  # separatorIds is required
    ({"separatorIds": []}, "spec/blend/separatorIds"),
    ({"separatorIds": [1], "recomputeRatio": 1.5}, "spec/blend/recomputeRatio"),
])
def test_crd_schema_refuses_bad_blends(body: dict[str, Any], blend: dict[str, Any], where: str) -> None:
    from test_operator_crd import schema, to_jsonschema

    doc = copy.deepcopy(body)
    doc["spec"]["blend"] = blend
    validator = jsonschema.Draft7Validator(to_jsonschema(schema()))
    paths = ["/".join(map(str, e.path)) for e in validator.iter_errors(doc)]
    assert where in paths, paths
