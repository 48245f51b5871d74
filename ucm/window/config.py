"""`ucm_window_config`: ReRoPE's parameters, validated without torch.

Why its own module: the connector validates its whole extra config at start-up, on the scheduler
side too, where torch is not loaded (tests/test_import_boundaries.py); the attention math that
uses these parameters is `ucm.window.rerope`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

SECTION = "ucm_window_config"
_KEYS = {"window", "leak", "log_scale", "trained_length"}


class WindowConfigError(ValueError):
    """`ucm_window_config` is not valid; the message names the key and what was expected."""


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    """ReRoPE's parameters: `window` w in tokens; `leak` k > 1 for leaky ReRoPE (None: clamp at w);
    `log_scale` scales queries beyond `trained_length` tokens by log(i + 1) / log(trained_length)."""

    window: int
    leak: float | None = None
    log_scale: bool = False
    trained_length: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise WindowConfigError(f"{SECTION}.window: expected a positive integer (tokens), got {self.window!r}")
        if self.leak is not None and (
            isinstance(self.leak, bool) or not isinstance(self.leak, (int, float)) or not self.leak > 1
        ):
            raise WindowConfigError(
                f"{SECTION}.leak: expected a number > 1 (the far distance grows as (d - window) / leak) "
                f"or null for plain ReRoPE, got {self.leak!r}"
            )
        if self.trained_length is not None and (
            isinstance(self.trained_length, bool) or not isinstance(self.trained_length, int)
            or self.trained_length < 2
        ):
            raise WindowConfigError(
                f"{SECTION}.trained_length: expected an integer >= 2 (the model's trained context), "
                f"got {self.trained_length!r}"
            )
        if self.log_scale and self.trained_length is None:
            raise WindowConfigError(f"{SECTION}.trained_length: required when log_scale is true")

    @classmethod
    def parse(cls, raw: Mapping[str, object]) -> WindowConfig:
        """Validate the connector's `ucm_window_config` object; unknown keys are refused by name."""
        if not isinstance(raw, Mapping):
            raise WindowConfigError(f"{SECTION}: expected an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise WindowConfigError(f"{SECTION}.{unknown[0]}: unknown key; accepted keys: {', '.join(sorted(_KEYS))}")
        if "window" not in raw:
            raise WindowConfigError(f"{SECTION}.window: required (tokens of exact relative positions)")
        log_scale = raw.get("log_scale", False)
        if not isinstance(log_scale, bool):
            raise WindowConfigError(f"{SECTION}.log_scale: expected true or false, got {log_scale!r}")
        leak = raw.get("leak")
        return cls(
            window=raw["window"],  # type: ignore[arg-type]  # checked in __post_init__
            leak=float(leak) if isinstance(leak, int) and not isinstance(leak, bool) else leak,  # type: ignore[arg-type]
            log_scale=log_scale,
            trained_length=raw.get("trained_length"),  # type: ignore[arg-type]
        )

    @property
    def method(self) -> str:
        return "rerope" if self.leak is None else "leaky-rerope"

    def identity(self) -> str:
        """What goes into the cache identity: every parameter that changes the KV bytes."""
        parts = [f"w={self.window}"]
        if self.leak is not None:
            parts.append(f"leak={self.leak:g}")
        if self.log_scale:
            parts.append(f"log={self.trained_length}")
        return f"rerope:{','.join(parts)}"
