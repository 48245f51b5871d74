"""Property-based tests of the spec parser: whatever a UCMCluster holds, the operator's pure path
(parse -> check -> build) ends in manifests or in an error naming a field of the user's document,
never in an exception the reconciler would turn into a crash loop.

Documents come from the shipped examples with one part replaced by arbitrary JSON, deleted, or
joined by an unknown key (the realistic mistakes), and from arbitrary JSON where `spec` belongs.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from operator_helpers import EXAMPLES, load_example
from ucm_operator.build import build_children
from ucm_operator.compat import check_cluster
from ucm_operator.spec import SpecError, parse_cluster

EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("ucmcluster-*.yaml"))
# A field path as SpecError and Problem name it: spec.decode[0].resources.requests.memory (an
# unknown key is named as the user spelled it, whatever its characters)
FIELD_PATH = re.compile(r"^(spec|metadata)(\..+|\[\d+\].*)?$", re.S)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every path to a value inside `node` (dict keys and list indexes)."""
    out: list[tuple[str | int, ...]] = []
    children: list[tuple[str | int, Any]] = []
    if isinstance(node, dict):
        children = list(node.items())
    elif isinstance(node, list):
        children = list(enumerate(node))
    for key, child in children:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


@st.composite
def mutated_clusters(draw: st.DrawFn) -> dict[str, Any]:
    body = load_example(draw(st.sampled_from(EXAMPLE_NAMES)))
    spec = body["spec"]
    path = draw(st.sampled_from(_paths(spec)))
    parent: Any = spec
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(("replace", "delete", "unknown-key")))
    if action == "replace":
        parent[path[-1]] = draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent[path[-1]], dict):
        parent[path[-1]][draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    return body


def desired_state(body: dict[str, Any]) -> str:
    """What the reconciler computes before it writes anything: 'ok', or the field it names."""
    try:
        spec = parse_cluster(copy.deepcopy(body))
    except SpecError as exc:
        assert FIELD_PATH.match(exc.field), f"SpecError names no field of the document: {exc.field!r}"
        assert exc.message, exc.field
        return exc.field
    problems = check_cluster(spec)
    for problem in problems:
        assert FIELD_PATH.match(problem.field), f"problem names no field of the document: {problem}"
    if problems:
        return problems[0].field
    children = build_children(spec)
    assert children and all(c.get("kind") and c.get("metadata", {}).get("name") for c in children)
    return "ok"


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_every_example_is_valid(name: str) -> None:
    assert desired_state(load_example(name)) == "ok"


@given(mutated_clusters())
def test_any_one_field_changed_gives_manifests_or_names_a_field(body: dict[str, Any]) -> None:
    desired_state(body)


@given(json_values)
def test_any_json_as_spec_gives_manifests_or_names_a_field(spec: Any) -> None:
    body = load_example()
    body["spec"] = spec
    desired_state(body)


@given(st.dictionaries(st.sampled_from(("name", "namespace", "uid", "generation", "labels")), json_values))
def test_any_metadata_gives_manifests_or_names_a_field(metadata: dict[str, Any]) -> None:
    body = load_example()
    body["metadata"] = metadata
    desired_state(body)


def test_found_by_the_properties_empty_requests_or_a_list_of_limits() -> None:
    """Regression: `requests:` left empty in YAML (null) crashed building the Deployment; a list
    where an object belongs now names the field."""
    body = load_example()
    body["spec"]["decode"][0]["resources"] = {"requests": None}
    assert desired_state(body) == "ok"
    body["spec"]["decode"][0]["resources"] = {"limits": ["1"]}
    assert desired_state(body) == "spec.decode[0].resources.limits"
