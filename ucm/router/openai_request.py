"""Parse and check OpenAI completion/chat requests, and build the prefill and decode bodies.

The router validates only the fields it relies on (model, prompt/messages, stream, the token
limits it rewrites) and forwards everything else untouched: vLLM validates the rest and its 4xx
answers pass through to the client. Bodies follow vLLM's disaggregated-serving protocol (its
`toy_proxy_server.py` and the NixlConnector's `request_finished`):

* prefill: the client's body with `max_tokens: 1` (and `max_completion_tokens: 1`), `stream:
  false`, no `stream_options`/`min_tokens`/`min_completion_tokens`, and `kv_transfer_params`
  `{"do_remote_decode": true, "do_remote_prefill": false, ...}` asking the prefill engine to keep
  the KV for a remote decode;
* decode: the client's original body plus the `kv_transfer_params` the prefill answer returned.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Literal

from ucm.router.errors import ApiError, invalid_field

RequestKind = Literal["completions", "chat"]
PATHS: dict[RequestKind, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# What the prefill request asks of the engine; the engine answers with the params decode needs.
PREFILL_KV_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_NOT_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")
_JSON_SPACE = b" \t\n\r"  # the whitespace JSON allows between tokens
_TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens", "min_completion_tokens")
# Deepest array/object nesting a body may have. Generous for OpenAI requests (tool and
# response-format JSON schemas nest a few dozen levels at most), and far below Python's recursion
# limit (1000 frames), which `json.loads`/`json.dumps` and every recursive consumer of the body
# down the line (the prefill body's encoding, engines' own parsers) would otherwise hit.
MAX_JSON_DEPTH = 128
MAX_TOKEN_ID = 2**31 - 1  # token ids are hashed as int32 (ucm.hashing), as engines store them
_TOKEN_ID = f"a token id (an integer from 0 to {MAX_TOKEN_ID})"
_TOKEN_IDS = f"a list of token ids (integers from 0 to {MAX_TOKEN_ID})"
# Text the router hashes for prefix affinity is encoded with `surrogatepass`: JSON may carry
# unpaired UTF-16 surrogates ("\ud800"), which strict UTF-8 refuses. The router does not refuse
# them itself: it checks only the fields it relies on, and affinity needs only a stable byte string
# for equal prefixes, which surrogatepass gives (losslessly, without scanning the whole prompt).
# The body reaches the engines as the client wrote it (decode gets the client's bytes, prefill a
# re-encoding whose `ensure_ascii` escapes the surrogates again), and the engine decides whether
# such text is a prompt it can tokenize (vLLM answers 400, which passes through).
_HASH_TEXT_ERRORS = "surrogatepass"


@dataclasses.dataclass
class ParsedRequest:
    """One client request after checking; `body` is the client's JSON object, never mutated."""

    kind: RequestKind
    raw: bytes
    body: dict[str, Any]
    stream: bool
    # Affinity input: the prompt's first bytes (text prompts and chat) or its first token ids.
    prefix_text: bytes | None
    prefix_tokens: list[int] | None

    @property
    def path(self) -> str:
        return PATHS[self.kind]


def parse_request(raw: bytes, kind: RequestKind, served_model: str, prefix_limit: int) -> ParsedRequest:
    """Decode and check one request body; raises ApiError (4xx) naming the offending field.

    `prefix_limit` bounds how much of the prompt is kept for prefix affinity (bytes of text or
    token ids), so huge prompts cost no more than small ones here."""
    body = _load_json(raw)
    if not isinstance(body, dict):
        raise ApiError(
            400,
            f"Request body must be a JSON object, got {type(body).__name__}.",
            code="invalid_json",
        )
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise invalid_field("model", "a string", model)
        if model != served_model:
            shown = model if len(model) <= 200 else model[:200] + "..."
            raise ApiError(
                404,
                f"The model `{shown}` does not exist. This router serves `{served_model}`.",
                param="model",
                code="model_not_found",
            )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_field("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_field("stream_options", "an object or null", options)
    for name in _TOKEN_LIMIT_FIELDS:
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise invalid_field(name, "a non-negative integer or null", value)
    if "kv_transfer_params" in body:
        raise ApiError(
            400,
            "'kv_transfer_params' is set by the router for prefill/decode hand-off; "
            "clients must not send it.",
            param="kv_transfer_params",
            code="invalid_value",
        )
    if kind == "completions":
        text, tokens = _completion_prefix(body, prefix_limit)
    else:
        text, tokens = _chat_prefix(body, prefix_limit), None
    return ParsedRequest(kind, raw, body, stream, text, tokens)


def _load_json(raw: bytes) -> Any:
    """`json.loads`, with every way it can fail on client input turned into a 400."""
    try:
        body = json.loads(raw)
    except RecursionError as exc:  # nesting deeper than the interpreter's stack
        raise _too_deep() from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from exc
    except ValueError as exc:
        # the only other ValueError json.loads raises: int() refusing a long digit string
        limit = sys.get_int_max_str_digits()
        raise ApiError(
            400,
            f"Request body holds an integer with more than {limit} digits; numbers must be shorter.",
            code="invalid_json",
        ) from exc
    # Depth is at most the number of '[' and '{' bytes (also in any encoding json.loads accepts),
    # so the usual body (a prompt, a few messages, a token list) skips the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _too_deep() -> ApiError:
    return ApiError(
        400,
        f"Request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
        code="invalid_json",
    )


def _deeper_than(value: object, limit: int) -> bool:
    """Whether `value` nests containers more than `limit` levels deep (level by level: no
    recursion, so it works at any depth json.loads returned)."""
    level = [value]
    for _ in range(limit):
        below: list[object] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            below.extend(c for c in children if isinstance(c, (dict, list)))
        if not below:
            return False
        level = below
    return True


def _is_token_id(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKEN_ID  # `type(...) is int` refuses booleans


def _check_token_list(param: str, value: object) -> list[int]:
    """`value` as a list of token ids, else a 400 naming the first bad item."""
    if not isinstance(value, list):
        raise invalid_field(param, _TOKEN_IDS, value)
    if not all(map(_is_token_id, value)):
        i, bad = next((i, t) for i, t in enumerate(value) if not _is_token_id(t))
        raise invalid_field(f"{param}[{i}]", _TOKEN_ID, bad)
    return value


def _completion_prefix(body: dict[str, Any], limit: int) -> tuple[bytes | None, list[int] | None]:
    if "prompt" not in body:
        raise ApiError(400, "Missing required field 'prompt'.", param="prompt", code="missing_field")
    prompt = body["prompt"]
    expected = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        return prompt[:limit].encode("utf-8", _HASH_TEXT_ERRORS)[:limit], None
    if not isinstance(prompt, list) or not prompt:
        raise invalid_field("prompt", f"a non-empty value: {expected}", prompt)
    first = prompt[0]
    if isinstance(first, str):
        for i, item in enumerate(prompt):
            if not isinstance(item, str):
                raise invalid_field(f"prompt[{i}]", "a string (like prompt[0])", item)
        return first[:limit].encode("utf-8", _HASH_TEXT_ERRORS)[:limit], None
    if isinstance(first, int) and not isinstance(first, bool):
        return None, _check_token_list("prompt", prompt)[:limit]
    if isinstance(first, list):
        for i, item in enumerate(prompt):
            _check_token_list(f"prompt[{i}]", item)
        return None, first[:limit]
    raise invalid_field("prompt", expected, prompt)


def _chat_prefix(body: dict[str, Any], limit: int) -> bytes:
    """The conversation's first bytes as role/content text. Later turns extend earlier ones, so a
    multi-turn chat keeps its affinity while its first `limit` bytes stay the same."""
    if "messages" not in body:
        raise ApiError(400, "Missing required field 'messages'.", param="messages", code="missing_field")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise invalid_field("messages", "a non-empty list of message objects", messages)
    parts: list[str] = []
    size = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_field(f"messages[{i}]", "an object with 'role' and 'content'", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid_field(f"messages[{i}].role", "a string", role)
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(_content_part_text(i, j, part) for j, part in enumerate(content))
        else:
            raise invalid_field(
                f"messages[{i}].content", "a string, a list of content parts or null", content
            )
        if size < limit:
            piece = f"{role}\x1f{text}\x1e"
            parts.append(piece)
            size += len(piece)
    return "".join(parts)[:limit].encode("utf-8", _HASH_TEXT_ERRORS)[:limit]


def _content_part_text(i: int, j: int, part: object) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise invalid_field(f"messages[{i}].content[{j}]", "an object with a string 'type'", part)
    for key in ("text", "image_url", "input_audio", "video_url"):
        value = part.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("url"), str):
            return str(value["url"])
    return str(part["type"])


def build_prefill_body(request: ParsedRequest) -> dict[str, Any]:
    """The prefill request: compute the prompt's KV, return one token and the hand-off params."""
    body = {k: v for k, v in request.body.items() if k not in _NOT_FOR_PREFILL}
    body["kv_transfer_params"] = dict(PREFILL_KV_TRANSFER_PARAMS)
    body["stream"] = False
    body["max_tokens"] = 1
    if request.kind == "chat" or "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    return body


def build_decode_body(request: ParsedRequest, kv_transfer_params: dict[str, Any] | None) -> bytes:
    """The decode request: the client's body, plus the prefill's hand-off params when it sent any.
    Without params the client's bytes are forwarded as they came (decode-only fallback).

    The params are spliced into the client's bytes before the object's closing brace rather than
    re-serialising the whole body: the prompt (often the bulk of it) is not encoded again, and
    every other member reaches decode byte for byte as the client wrote it. `parse_request`
    rejected a client-sent `kv_transfer_params`, so the spliced member is the only one. Bodies
    that are not plain UTF-8 text starting with `{` (a BOM, UTF-16/32, which `json.loads`
    also accepts) are re-serialised instead."""
    if kv_transfer_params is None:
        return request.raw
    params = json.dumps(kv_transfer_params).encode()
    raw = request.raw.strip(_JSON_SPACE)
    if raw.startswith(b"{") and raw.endswith(b"}"):
        inner = raw[1:-1].strip(_JSON_SPACE)
        return raw[:-1] + (b',"kv_transfer_params":' if inner else b'"kv_transfer_params":') + params + b"}"
    body = dict(request.body)
    body["kv_transfer_params"] = kv_transfer_params
    return json.dumps(body).encode()
