"""autoscale.decide without a cluster: decode follows the router's in-flight requests, prefill
follows decode at the ratio (within one replica at every step), stabilisation windows, per-pool
bounds, and no scale-in that could remove the last Ready same-revision prefill+decode pair."""

from __future__ import annotations

import copy
import math
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_operator_crd import schema, to_jsonschema
from ucm_operator.autoscale import (
    INFLIGHT_METRIC,
    Policy,
    PolicyError,
    PoolBounds,
    Recommendation,
    check_policy,
    decide,
    keeps_a_pair,
    parse_router_inflight,
    policy_of,
    policy_problems,
    split,
)
from ucm_operator.meta import revision
from ucm_operator.signals import router_metric_urls
from ucm_operator.spec import SpecError, parse_cluster
from ucm_operator.status import Observed, compute_status

STEADY = {"rev1": {"prefill": 10, "decode": 10}}   # plenty Ready: the pair rule never binds


def policy(**overrides: object) -> Policy:
    base: dict[str, object] = dict(
        pools=(PoolBounds("p", "prefill", 1, 4), PoolBounds("d", "decode", 1, 8)),
        ratio_prefill=1, ratio_decode=2, target_inflight_per_decode=8.0,
        scale_up_window_s=0.0, scale_down_window_s=60.0)
    base.update(overrides)
    return Policy(**base)  # type: ignore[arg-type]


def test_load_scales_decode_and_prefill_follows_at_the_ratio() -> None:
    pol = policy()
    up = decide(pol, inflight=40, current={"p": 1, "d": 1}, ready=STEADY, history=(), now=0.0)
    assert (up.decode, up.prefill, up.replicas) == (5, 3, {"d": 5, "p": 3})   # ceil(40/8)=5; 5/2=2.5 -> 3
    assert "40 in flight" in up.reason
    # The maxima bind: 200 in flight wants 25 decode pods, the pool allows 8 (and prefill 4).
    capped = decide(pol, inflight=200, current={"p": 1, "d": 1}, ready=STEADY, history=(), now=0.0)
    assert (capped.decode, capped.prefill) == (8, 4)
    # Idle keeps the minimum, never zero decode pods.
    idle = decide(pol, inflight=0, current={"p": 1, "d": 1}, ready=STEADY, history=(), now=0.0)
    assert (idle.decode, idle.prefill) == (1, 1)


def test_scale_down_waits_for_the_down_window() -> None:
    pol = policy(scale_down_window_s=60.0)
    first = decide(pol, inflight=64, current={"p": 1, "d": 1}, ready=STEADY, history=(), now=0.0)
    assert first.decode == 8
    # Load drops at t=10: the window still holds the recommendation of 8, so nothing shrinks.
    dip = decide(pol, inflight=8, current={"p": 4, "d": 8}, ready=STEADY, history=first.history, now=10.0)
    assert (dip.decode, dip.prefill) == (8, 4) and "stabilised to 8" in dip.reason
    # After the window (t=70), only the low recommendations remain: down to 1 decode, 1 prefill.
    later = decide(pol, inflight=8, current={"p": 4, "d": 8}, ready=STEADY, history=dip.history, now=70.0)
    assert (later.decode, later.prefill) == (1, 1)
    assert all(70.0 - r.at <= 60.0 for r in later.history)   # history is bounded by the windows


def test_scale_up_window_ignores_a_short_spike() -> None:
    pol = policy(scale_up_window_s=30.0)
    calm = decide(pol, inflight=8, current={"p": 1, "d": 1}, ready=STEADY, history=(), now=0.0)
    spike = decide(pol, inflight=64, current={"p": 1, "d": 1}, ready=STEADY, history=calm.history, now=5.0)
    assert spike.decode == 1   # the up-window's lowest recommendation is still 1
    sustained = decide(pol, inflight=64, current={"p": 1, "d": 1}, ready=STEADY,
                       history=(Recommendation(0.0, 8), Recommendation(20.0, 8)), now=35.0)
    assert sustained.decode == 8


def test_scale_in_never_removes_the_last_ready_pair_during_a_rollout() -> None:
    pol = policy(scale_down_window_s=0.0)
    # Mid-rollout: rev1 serves with 1 prefill + 1 decode Ready; rev2's pods are not Ready yet.
    rolling = {"rev1": {"prefill": 1, "decode": 1}, "rev2": {"prefill": 0, "decode": 0}}
    held = decide(pol, inflight=0, current={"p": 2, "d": 4}, ready=rolling, history=(), now=0.0)
    assert (held.decode, held.prefill) == (4, 2) and "scale-in held" in held.reason
    # Scale-out is never held back by the rule.
    out = decide(pol, inflight=64, current={"p": 2, "d": 4}, ready=rolling, history=(), now=0.0)
    assert (out.decode, out.prefill) == (8, 4)
    # Once enough pods of one revision are Ready, the same scale-in goes ahead.
    settled = {"rev2": {"prefill": 2, "decode": 4}}
    assert decide(pol, inflight=0, current={"p": 2, "d": 4}, ready=settled, history=(), now=0.0).decode == 1


def test_pair_rule_assumes_the_worst_choice_of_pods() -> None:
    assert keeps_a_pair({"a": {"prefill": 2, "decode": 3}}, remove_prefill=1, remove_decode=2, pd=True)
    assert not keeps_a_pair({"a": {"prefill": 2, "decode": 3}}, remove_prefill=2, remove_decode=0, pd=True)
    assert keeps_a_pair({"a": {"decode": 2}}, remove_prefill=0, remove_decode=1, pd=False)
    assert not keeps_a_pair({}, remove_prefill=0, remove_decode=1, pd=False)


def test_split_fills_pools_evenly_within_their_bounds() -> None:
    pools = (PoolBounds("a", "decode", 1, 2), PoolBounds("b", "decode", 0, 10), PoolBounds("c", "decode", 2, 3))
    assert split(3, pools) == {"a": 1, "b": 0, "c": 2}
    assert split(7, pools) == {"a": 2, "b": 3, "c": 2}   # fewest first; ties: the first listed
    assert split(100, pools) == {"a": 2, "b": 10, "c": 3}


@pytest.mark.parametrize(("pools", "field"), [
    ((PoolBounds("p", "prefill", 3, 4), PoolBounds("d", "decode", 1, 8)), "spec.autoscaling.pools"),  # 3 prefill vs 1 decode
    ((PoolBounds("p", "prefill", 1, 1), PoolBounds("d", "decode", 1, 8)), "spec.autoscaling.pools"),  # 1 prefill vs 8 decode
    ((PoolBounds("p", "prefill", 2, 1), PoolBounds("d", "decode", 1, 8)), "spec.autoscaling.pools[0]"),
    ((PoolBounds("d", "decode", 0, 0),), "spec.autoscaling.pools"),
])
def test_impossible_policies_are_refused_naming_the_field(pools: tuple[PoolBounds, ...], field: str) -> None:
    with pytest.raises(PolicyError) as refused:
        check_policy(policy(pools=pools))
    assert refused.value.field == field


def test_the_example_policy_is_possible() -> None:
    check_policy(policy())


@settings(max_examples=300, deadline=None)
@given(inflight=st.floats(0, 500), cur_decode=st.integers(1, 8), steps=st.lists(st.floats(0, 500), max_size=6),
       ready_p=st.integers(0, 4), ready_d=st.integers(0, 8), ratio=st.sampled_from([(1, 1), (1, 2), (1, 3), (2, 3)]))
def test_every_decision_keeps_ratio_bounds_and_a_pair(inflight: float, cur_decode: int, steps: list[float],
                                                      ready_p: int, ready_d: int, ratio: tuple[int, int]) -> None:
    rp, rd = ratio
    pol = policy(ratio_prefill=rp, ratio_decode=rd,
                 pools=(PoolBounds("p", "prefill", max(1, math.floor(rp / rd + 0.5)), 8),
                        PoolBounds("d", "decode", 1, 8)))
    check_policy(pol)
    current = {"d": cur_decode, "p": pol.prefill_for(cur_decode)}
    ready = {"r": {"prefill": min(ready_p, current["p"]), "decode": min(ready_d, cur_decode)}}
    history: tuple[Recommendation, ...] = ()
    for i, load in enumerate([inflight, *steps]):
        decision = decide(pol, inflight=load, current=current, ready=ready, history=history, now=float(i * 20))
        assert pol.ratio_ok(decision.prefill, decision.decode), decision
        assert 1 <= decision.decode <= 8 and 1 <= decision.prefill <= 8
        assert decision.replicas == {"d": decision.decode, "p": decision.prefill}
        if decision.decode < current["d"] or decision.prefill < current["p"]:
            assert keeps_a_pair(ready, current["p"] - decision.prefill, current["d"] - decision.decode, True)
        current, history = dict(decision.replicas), decision.history


def test_inflight_is_read_from_the_real_routers_metrics_text() -> None:
    """The operator parses what ucm/router/metrics.py renders (the operator itself imports no ucm)."""
    from ucm.router.endpoints import Registry
    from ucm.router.metrics import RouterMetrics

    texts = []
    for inflight in (3, 4):
        metrics = RouterMetrics(Registry())
        metrics.track_inflight(lambda n=inflight: float(n))
        texts.append(metrics.render().decode())
    assert INFLIGHT_METRIC in texts[0]
    assert parse_router_inflight(texts) == 7.0
    with pytest.raises(ValueError, match="router #1: no ucm_router_inflight_requests"):
        parse_router_inflight([texts[0], "# nothing here\nother_metric 1\n"])


def test_without_history_nothing_shrinks_before_a_whole_down_window() -> None:
    """A restarted operator has no recommendations: it must not read that as 'idle for a while'."""
    pol = policy(scale_down_window_s=60.0)
    first = decide(pol, inflight=0, current={"p": 4, "d": 8}, ready=STEADY, history=(), now=100.0)
    assert (first.decode, first.prefill) == (8, 4)
    assert decide(pol, inflight=0, current={"p": 4, "d": 8}, ready=STEADY, history=first.history, now=159.0).decode == 8
    assert decide(pol, inflight=0, current={"p": 4, "d": 8}, ready=STEADY, history=first.history, now=160.0).decode == 1


# --- spec.autoscaling: parsing, refusals, status -----------------------------------------------

AUTO = {"pools": [{"name": "h100", "minReplicas": 1, "maxReplicas": 4}, {"name": "l40s", "maxReplicas": 8}],
        "ratio": {"prefill": 1, "decode": 2}, "targetInflightPerDecode": 4}


def with_autoscaling(hetero: dict[str, Any], auto: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(hetero)
    body["spec"]["autoscaling"] = copy.deepcopy(auto)
    return body


def test_spec_autoscaling_becomes_a_policy(hetero: dict[str, Any]) -> None:
    spec = parse_cluster(with_autoscaling(hetero, AUTO))
    pol = policy_of(spec)
    assert pol == Policy(pools=(PoolBounds("h100", "prefill", 1, 4), PoolBounds("l40s", "decode", 1, 8)),
                         ratio_prefill=1, ratio_decode=2, target_inflight_per_decode=4.0,
                         scale_up_window_s=0.0, scale_down_window_s=300.0)
    assert spec.autoscaling is not None and spec.autoscaling.interval_seconds == 15
    assert policy_problems(spec) == []
    assert policy_of(parse_cluster(hetero)) is None


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda a: a["pools"].append({"name": "nope", "maxReplicas": 2}), "spec.autoscaling.pools[2].name"),
    (lambda a: a["pools"].append({"name": "l40s", "maxReplicas": 2}), "spec.autoscaling.pools[2].name"),
    (lambda a: a["pools"].pop(0), "spec.autoscaling.pools"),                      # h100 has no bounds
    (lambda a: a["pools"][1].pop("maxReplicas"), "spec.autoscaling.pools[1].maxReplicas"),
    (lambda a: a.update(targetInflightPerDecode=True), "spec.autoscaling.targetInflightPerDecode"),
    (lambda a: a.update(scaleDown=3), "spec.autoscaling.scaleDown"),
])
def test_bad_autoscaling_names_the_field(hetero: dict[str, Any], mutate: Any, field: str) -> None:
    auto = copy.deepcopy(AUTO)
    mutate(auto)
    with pytest.raises(SpecError) as refused:
        parse_cluster(with_autoscaling(hetero, auto))
    assert refused.value.field == field


def test_an_impossible_policy_is_invalid_not_an_exception(hetero: dict[str, Any]) -> None:
    auto = copy.deepcopy(AUTO)
    auto["pools"][0]["maxReplicas"] = 1      # 1 prefill cannot stay within one replica of 8 decode / 2
    (problem,) = policy_problems(parse_cluster(with_autoscaling(hetero, auto)))
    assert (problem.field, problem.reason) == ("spec.autoscaling.pools", "ImpossibleAutoscaling")
    assert "at 5 decode replicas" in problem.message


def test_autoscaling_matches_the_crd_and_its_status_schema(hetero: dict[str, Any]) -> None:
    body = with_autoscaling(hetero, AUTO)
    validator = jsonschema.Draft7Validator(to_jsonschema(schema()))
    assert [e.message for e in validator.iter_errors(body)] == []
    body["spec"]["autoscaling"]["ratio"]["decode"] = 0
    assert ["spec", "autoscaling", "ratio", "decode"] in [list(e.path) for e in validator.iter_errors(body)]
    spec = parse_cluster(with_autoscaling(hetero, AUTO))
    status = compute_status(Observed(spec=spec, generation=1, revision=revision(spec),
                                     autoscaling={"inflight": 3.0, "prefill": 1, "decode": 1, "message": "m"}), None)
    assert status["autoscaling"]["inflight"] == 3.0
    jsonschema.Draft7Validator(to_jsonschema(schema()["properties"]["status"])).validate(status)


def test_router_metric_urls_are_the_ready_router_pods() -> None:
    def pod(role: str, ip: str | None, ready: bool = True) -> dict[str, Any]:
        return {"metadata": {"labels": {"ucm.dev/role": role}},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}}
    pods = [pod("router", "10.0.0.2"), pod("router", "fd00::5"), pod("router", "10.0.0.3", ready=False),
            pod("decode", "10.0.0.9"), pod("router", None)]
    assert router_metric_urls("ns", "c", pods, None) == ["http://10.0.0.2:8000/metrics", "http://[fd00::5]:8000/metrics"]
    assert router_metric_urls("ns", "c", pods, "http://127.0.0.1:9/{namespace}/{name}") == ["http://127.0.0.1:9/ns/c"]
