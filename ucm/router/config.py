"""Router settings (one dataclass; the CLI fills it from flags and environment)."""

from __future__ import annotations

import dataclasses
from typing import Literal

Fallback = Literal["decode-only", "fail"]
Policy = Literal["least-loaded", "prefix-affinity"]
_MAY_BE_ZERO = ("probe_interval_s", "shutdown_delay_s")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    model: str
    host: str = "0.0.0.0"
    port: int = 8000
    fallback: Fallback = "decode-only"
    policy: Policy = "prefix-affinity"
    # Robustness limits.
    max_body_bytes: int = 16 * 1024 * 1024
    # Client connections (see ucm/router/connection.py): each request line and each header field
    # may hold `max_header_bytes`, a request at most `max_headers` fields (431 beyond either), so
    # a request's head costs at most about their product in memory.
    max_header_bytes: int = 8190
    max_headers: int = 100
    # A client must send a request's complete headers within this long of connecting (first
    # request) or of the request's first byte (later requests on a kept-alive connection), and
    # its whole body within `body_timeout_s` after the headers: slow clients cannot hold
    # connections, or concurrency slots, indefinitely (408).
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    max_concurrent: int = 1024  # beyond this the router answers 503 at once (no queue)
    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 120.0  # to response headers: prefill, and a stream's first event
    idle_timeout_s: float = 60.0  # between two reads of an upstream body
    request_timeout_s: float = 600.0  # to the headers of a non-streaming decode (whole generation)
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    # SIGTERM: keep serving this long with /ready failing before closing the listener, so that
    # endpoints controllers and load balancers stop sending new connections first (0 = close at once).
    shutdown_delay_s: float = 0.0
    # Health.
    eject_after_failures: int = 3
    eject_base_s: float = 1.0
    eject_max_s: float = 30.0
    probe_interval_s: float = 5.0  # 0 turns active probes off (passive ejection still works)
    probe_timeout_s: float = 2.0
    # Prefix affinity.
    affinity_prefix_blocks: int = 16
    affinity_slack: int = 4  # warm pod may have this many more outstanding than the least loaded

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("RouterConfig.model (--model) must be the served model name, got ''")
        if self.fallback not in ("decode-only", "fail"):
            raise ValueError(f"fallback must be 'decode-only' or 'fail', got {self.fallback!r}")
        if self.policy not in ("least-loaded", "prefix-affinity"):
            raise ValueError(f"policy must be 'least-loaded' or 'prefix-affinity', got {self.policy!r}")
        positive = (
            "max_body_bytes", "max_header_bytes", "max_headers", "max_concurrent",
            "eject_after_failures", "affinity_prefix_blocks",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for field in dataclasses.fields(self):
            if not field.name.endswith("_s"):
                continue
            value = getattr(self, field.name)
            if field.name in _MAY_BE_ZERO and value < 0:
                raise ValueError(f"{field.name} must be >= 0 seconds (0 = off), got {value}")
            if field.name not in _MAY_BE_ZERO and value <= 0:
                raise ValueError(f"{field.name} must be positive seconds, got {value}")
