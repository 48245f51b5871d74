"""OpenAI-style error bodies.

Clients of an OpenAI-compatible server parse `{"error": {"message", "type", "param", "code"}}`;
the router answers every failure it generates itself in that shape (upstream errors pass
through unchanged), so SDKs surface a readable message that names the offending field.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class ApiError(Exception):
    """A failure the router reports to the client: HTTP status plus OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        # Close the connection after the answer: the client's stream is in an unknown state (a
        # body that stalled or was framed wrongly), or the router is going away.
        self.close = close

    def body(self) -> dict[str, Any]:
        return build_error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> web.Response:
        response = web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=self.headers,
        )
        if self.close:
            response.force_close()
        return response


def build_error_body(
    message: str, *, type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """The JSON object OpenAI clients expect for an error (also used inside SSE error events)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_field(param: str, expected: str, got: object) -> ApiError:
    """400 for a field of the wrong type or value; names the field and what was expected."""
    shown = type(got).__name__ if not isinstance(got, (int, float, str, bool)) else shorten(got)
    return ApiError(
        400,
        f"Invalid value for '{param}': expected {expected}, got {shown}.",
        param=param,
        code="invalid_value",
    )


def shorten(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to about `limit` characters: error messages echo what the client sent
    (a 16 MiB string, an integer of 4300 digits) without growing with it."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit] + "...")
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def overloaded(message: str) -> ApiError:
    """503 with Retry-After: the router sheds load instead of queueing without bound."""
    return ApiError(503, message, type="server_overloaded", code="overloaded", headers={"Retry-After": "1"})


def unavailable(message: str, code: str = "no_upstream") -> ApiError:
    return ApiError(503, message, type="service_unavailable", code=code, headers={"Retry-After": "1"})


def bad_gateway(message: str, code: str = "upstream_error") -> ApiError:
    return ApiError(502, message, type="upstream_error", code=code)


def gateway_timeout(message: str) -> ApiError:
    return ApiError(504, message, type="upstream_timeout", code="upstream_timeout")
