"""Pure parts of the router: request checking, body building, pairing, balancing, ejection,
prefix keys and the Kubernetes endpoint view."""

from __future__ import annotations

import json

import pytest

from ucm.router.affinity import TEXT_BLOCK_BYTES, PrefixKeyer
from ucm.router.endpoints import EjectionPolicy, Endpoint, Registry
from ucm.router.errors import ApiError
from ucm.router.kube import build_endpoints
from ucm.router.openai_request import build_decode_body, build_prefill_body, parse_request

MODEL = "m"


def parse(body: object, kind: str = "completions") -> object:
    return parse_request(json.dumps(body).encode(), kind, MODEL, 1024)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "status", "param", "needle"),
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        (b'{"model": 3, "prompt": "x"}', 400, "model", "expected a string"),
        (b'{"model": "other", "prompt": "x"}', 404, "model", "`other` does not exist"),
        (b'{"model": "m"}', 400, "prompt", "Missing required field 'prompt'"),
        (b'{"prompt": 5}', 400, "prompt", "Invalid value for 'prompt'"),
        (b'{"prompt": []}', 400, "prompt", "non-empty"),
        (b'{"prompt": ["a", 3]}', 400, "prompt[1]", "a string"),
        (b'{"prompt": [1, "a"]}', 400, "prompt[1]", "a token id"),
        (b'{"prompt": [1, -2]}', 400, "prompt[1]", "an integer from 0 to 2147483647"),
        (b'{"prompt": [1, 2147483648]}', 400, "prompt[1]", "got 2147483648"),
        (b'{"prompt": [[1], [2, true]]}', 400, "prompt[1][1]", "a token id"),
        (b'{"prompt": [[1], 2]}', 400, "prompt[1]", "a list of token ids"),
        (b'{"prompt": "x", "stream": "yes"}', 400, "stream", "a boolean"),
        (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens", "non-negative integer"),
        (b'{"prompt": "x", "max_tokens": true}', 400, "max_tokens", "non-negative integer"),
        (b'{"prompt": "x", "stream_options": 1}', 400, "stream_options", "an object"),
        (b'{"prompt": "x", "kv_transfer_params": {}}', 400, "kv_transfer_params", "set by the router"),
    ],
)
def test_completion_errors_name_the_field(raw: bytes, status: int, param: str | None, needle: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(raw, "completions", MODEL, 1024)
    err = info.value
    assert (err.status, err.param) == (status, param)
    assert needle in err.message
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0]"),
    ],
)
def test_chat_errors_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(body, "chat")
    assert info.value.param == param and info.value.status == 400


def test_prefill_body_follows_vllm_protocol() -> None:
    req = parse_request(
        json.dumps(
            {
                "model": MODEL,
                "prompt": "p",
                "max_tokens": 50,
                "stream": True,
                "stream_options": {"include_usage": True},
                "min_tokens": 3,
                "temperature": 0.5,
            }
        ).encode(),
        "completions",
        MODEL,
        1024,
    )
    body = build_prefill_body(req)
    assert body["max_tokens"] == 1 and body["stream"] is False
    assert "stream_options" not in body and "min_tokens" not in body and "max_completion_tokens" not in body
    assert body["kv_transfer_params"]["do_remote_decode"] is True
    assert body["kv_transfer_params"]["do_remote_prefill"] is False
    assert body["temperature"] == 0.5
    assert req.body["max_tokens"] == 50 and req.body["stream"] is True  # the client's body is untouched
    params = {"do_remote_prefill": True, "remote_engine_id": "e"}
    decode = json.loads(build_decode_body(req, params))
    assert decode == {**req.body, "kv_transfer_params": params}
    assert build_decode_body(req, None) is req.raw


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "prompt": "caf\xc3\xa9 } {", "max_tokens": 5}',  # braces inside a string
        b' \n{"prompt":[1,2,3],"stream":true}\r\n ',  # JSON whitespace around the object
        b'{"prompt": "x", "n": 1.50, "logit_bias": {"7": -1e2}}',  # number spellings kept as sent
    ],
)
def test_decode_body_is_the_client_bytes_plus_params(raw: bytes) -> None:
    req = parse_request(raw, "completions", MODEL, 1024)
    params = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[0, 1]]}
    out = build_decode_body(req, params)
    assert json.loads(out) == {**req.body, "kv_transfer_params": params}
    body = raw.strip()
    assert out.startswith(body[:-1]) and out.endswith(b"}")  # every client member byte for byte


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_decode_body_of_other_json_encodings_is_reserialised(encoding: str) -> None:
    raw = json.dumps({"prompt": "x", "max_tokens": 3}).encode(encoding)  # json.loads accepts all three
    req = parse_request(raw, "completions", MODEL, 1024)
    params = {"do_remote_prefill": True, "remote_engine_id": "e"}
    assert json.loads(build_decode_body(req, params)) == {
        "prompt": "x",
        "max_tokens": 3,
        "kv_transfer_params": params,
    }


def test_chat_prefill_caps_max_completion_tokens() -> None:
    req = parse({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}, "chat")
    body = build_prefill_body(req)  # type: ignore[arg-type]
    assert body["max_completion_tokens"] == 1 and body["max_tokens"] == 1


def test_prefix_keys_are_stable_and_prefix_based() -> None:
    keyer = PrefixKeyer("m", prefix_blocks=4)
    shared = b"S" * (TEXT_BLOCK_BYTES * 4)
    a = keyer.key(shared + b"tail one", None)
    b = keyer.key(shared + b"another tail", None)
    assert a is not None and a == b  # same first 4 blocks -> same key
    assert keyer.key(b"X" + shared, None) != a
    assert keyer.key(b"short", None) is None  # no full block: balanced by load
    assert keyer.key(None, list(range(100))) == PrefixKeyer("m", 4).key(None, [*range(64), 7])
    assert keyer.key(None, list(range(10))) is None


def ep(name: str, role: str, revision: str, created: float = 0.0) -> Endpoint:
    return Endpoint(f"http://{name}:8000", role, revision, name=name, created=created)  # type: ignore[arg-type]


def test_pairs_only_within_a_revision_and_prefers_newest_on_ties() -> None:
    reg = Registry()
    reg.set_endpoints([ep("p-old", "prefill", "old", 1), ep("d-new", "decode", "new", 5)])
    assert reg.choose_route(None) is None  # one role per revision: no pair, never mixed
    assert reg.complete_revisions() == []
    reg.set_endpoints(
        [
            ep("p-old", "prefill", "old", 1),
            ep("d-old", "decode", "old", 1),
            ep("p-new", "prefill", "new", 5),
            ep("d-new", "decode", "new", 5),
        ]
    )
    route = reg.choose_route(None)
    assert route is not None and route.revision == "new" and route.prefill.endpoint.name == "p-new"
    decode = reg.choose_decode(route.revision)
    assert decode is not None and decode.endpoint.name == "d-new"
    # load moves traffic to the less busy revision, still within one revision
    with reg.lease(route.prefill), reg.lease(decode):
        route2 = reg.choose_route(None)
        assert route2 is not None and route2.revision == "old"
        decode2 = reg.choose_decode("old")
        assert decode2 is not None and decode2.endpoint.revision == "old"


def test_least_outstanding_and_rotation_on_ties() -> None:
    reg = Registry()
    reg.set_endpoints([ep(f"d{i}", "decode", "r") for i in range(3)])
    seen = {reg.choose_decode("r").endpoint.name for _ in range(3)}  # type: ignore[union-attr]
    assert seen == {"d0", "d1", "d2"}
    states = {s.endpoint.name: s for s in reg.states()}
    with reg.lease(states["d0"]), reg.lease(states["d1"]):
        assert all(reg.choose_decode("r").endpoint.name == "d2" for _ in range(5))  # type: ignore[union-attr]


def test_affinity_is_rendezvous_and_overflows_when_busy() -> None:
    reg = Registry(affinity_slack=2)
    prefills = [ep(f"p{i}", "prefill", "r") for i in range(4)]
    reg.set_endpoints([*prefills, ep("d", "decode", "r")])
    keys = [bytes([i]) * 16 for i in range(64)]
    owner = {k: reg.choose_route(k).prefill.endpoint.name for k in keys}  # type: ignore[union-attr]
    assert len(set(owner.values())) == 4  # keys spread over all pods
    assert all(reg.choose_route(k).affinity == "hit" for k in keys)  # type: ignore[union-attr]
    # removing one pod moves only the keys it owned
    reg.set_endpoints([*prefills[1:], ep("d", "decode", "r")])
    moved = {k for k in keys if reg.choose_route(k).prefill.endpoint.name != owner[k]}  # type: ignore[union-attr]
    assert moved == {k for k in keys if owner[k] == "p0"}
    # a warm pod busier than the least loaded by more than the slack loses the request
    key = keys[0]
    warm = next(s for s in reg.states() if s.endpoint.name == reg.choose_route(key).prefill.endpoint.name)  # type: ignore[union-attr]
    for _ in range(3):
        warm.outstanding += 1
    route = reg.choose_route(key)
    assert route is not None and route.affinity == "overflow" and route.prefill is not warm


def test_ejection_backs_off_and_success_resets() -> None:
    now = [100.0]
    reg = Registry(EjectionPolicy(failures=2, base_s=1.0, max_s=3.0), clock=lambda: now[0])
    reg.set_endpoints([ep("d0", "decode", "r"), ep("d1", "decode", "r")])
    d0 = next(s for s in reg.states() if s.endpoint.name == "d0")
    assert reg.record_failure(d0) is False
    assert reg.record_failure(d0) is True  # second consecutive failure ejects for 1 s
    assert all(reg.choose_decode("r").endpoint.name == "d1" for _ in range(4))  # type: ignore[union-attr]
    now[0] += 1.0
    assert d0.available(now[0])
    reg.record_failure(d0)
    reg.record_failure(d0)
    assert d0.ejected_until == now[0] + 2.0  # second ejection: doubled
    reg.record_failure(d0)
    reg.record_failure(d0)
    assert d0.ejected_until == now[0] + 3.0  # capped
    reg.record_success(d0)
    assert d0.ejections == 0 and d0.consecutive_failures == 0
    # counters survive rediscovery of the same endpoint
    reg.set_endpoints([ep("d0", "decode", "r")])
    assert reg.states()[0] is d0


def _slice(
    name: str, role: str, endpoints: list[dict[str, object]], port: int | None = 8000
) -> dict[str, object]:
    ports = [{"name": "http", "port": port}] if port else None
    return {
        "metadata": {"name": name, "labels": {"ucm.dev/role": role}},
        "endpoints": endpoints,
        "ports": ports,
    }


def _pod(name: str, role: str, revision: str | None, terminating: bool = False) -> dict[str, object]:
    labels = {"ucm.dev/role": role, "ucm.dev/pool": "h100"}
    if revision:
        labels["ucm.dev/revision"] = revision
    meta: dict[str, object] = {"name": name, "labels": labels, "creationTimestamp": "2026-11-28T10:00:00Z"}
    if terminating:
        meta["deletionTimestamp"] = "2026-11-28T11:00:00Z"
    return {"metadata": meta}


def _addr(ip: str, pod: str, ready: bool = True) -> dict[str, object]:
    return {"addresses": [ip], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod}}


def test_kubernetes_endpoint_view() -> None:
    slices = {
        "s1": _slice(
            "s1",
            "prefill",
            [
                _addr("10.0.0.1", "p1"),
                _addr("10.0.0.2", "p2", ready=False),
                _addr("10.0.0.3", "p3"),
                _addr("10.0.0.4", "p4"),
                _addr("10.0.0.5", "gone"),
            ],
        ),
        "s2": _slice("s2", "decode", [_addr("fd00::6", "d1")], port=None),
    }
    pods = {
        "p1": _pod("p1", "prefill", "abc"),
        "p2": _pod("p2", "prefill", "abc"),
        "p3": _pod("p3", "prefill", None),  # no revision: cannot be paired
        "p4": _pod("p4", "prefill", "abc", terminating=True),
        "d1": _pod("d1", "decode", "abc"),
    }
    eps = build_endpoints(slices, pods, default_port=9000)
    assert [(e.role, e.url, e.revision, e.pool, e.name) for e in eps] == [
        ("decode", "http://[fd00::6]:9000", "abc", "h100", "d1"),
        ("prefill", "http://10.0.0.1:8000", "abc", "h100", "p1"),
    ]
    assert eps[0].created > 0


def test_config_errors_name_the_setting() -> None:
    from ucm.router.config import RouterConfig

    RouterConfig(model="m", probe_interval_s=0, shutdown_delay_s=0)  # 0 = off is allowed there
    for bad, needle in [
        ({"idle_timeout_s": 0}, "idle_timeout_s must be positive"),
        ({"shutdown_delay_s": -1}, "shutdown_delay_s must be >= 0"),
        ({"max_concurrent": 0}, "max_concurrent must be positive"),
        ({"fallback": "maybe"}, "fallback must be 'decode-only' or 'fail'"),
        ({"model": ""}, "--model"),
    ]:
        with pytest.raises(ValueError, match=needle):
            RouterConfig(**{"model": "m", **bad})  # type: ignore[arg-type]
