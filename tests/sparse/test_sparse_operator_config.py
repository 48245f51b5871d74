"""`spec.sparse` of a UCMCluster becomes the connector's `ucm_sparse_config`: the CRD's fields, the
operator's mapping and the algorithm's config must agree (the operator cannot import the algorithm,
which needs torch, so this test holds the three together)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pytest
import yaml
from ucm_operator.meta import connector_extra_config
from ucm_operator.spec import SPARSE_FIELDS, parse_cluster

from ucm.sparse import SparseConfigError
from ucm.sparse import retrieval_math as rm
from ucm.sparse.block_retrieval import BlockRetrievalConfig, BlockRetrievalSparse

REPO = pathlib.Path(__file__).resolve().parents[2]


def crd_sparse() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "ucm.dev_ucmclusters.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["sparse"]
    return dict(schema["properties"])


def test_crd_operator_and_algorithm_name_the_same_settings() -> None:
    props = crd_sparse()
    assert set(props) == {"algorithm", *SPARSE_FIELDS}
    assert props["algorithm"]["enum"] == [BlockRetrievalSparse.name]
    assert set(props["summary"]["enum"]) == set(rm.SUMMARY_KINDS)
    config_fields = {f.name for f in dataclasses.fields(BlockRetrievalConfig)}
    assert {key for key, _ in SPARSE_FIELDS.values()} <= config_fields


@pytest.mark.parametrize("field", [f for f in SPARSE_FIELDS if f not in ("summary", "offload")])
def test_crd_bounds_are_the_algorithms(field: str) -> None:
    """The API server's minimum is accepted by the algorithm and just below it refused, so a spec
    the API server admits never fails in the worker."""
    schema, (key, _) = crd_sparse()[field], SPARSE_FIELDS[field]
    lowest = schema["minimum"]
    step = 1 if schema["type"] == "integer" else 0.0
    if schema.get("exclusiveMinimum"):
        lowest, step = lowest + 1e-6, 1e-6
    BlockRetrievalConfig.from_dict({key: lowest})
    BlockRetrievalConfig.from_dict({key: schema["maximum"]})
    with pytest.raises(SparseConfigError, match=key):
        BlockRetrievalConfig.from_dict({key: lowest - step})


def test_the_long_context_example_yields_a_valid_algorithm_config() -> None:
    spec = parse_cluster(yaml.safe_load((REPO / "examples" / "ucmcluster-long-context.yaml").read_text()))
    sparse = dict(connector_extra_config(spec)["ucm_sparse_config"])
    assert sparse.pop("name") == "block_retrieval"
    config = BlockRetrievalConfig.from_dict(sparse)
    assert config.offload and config.keep_ratio == 0.25
