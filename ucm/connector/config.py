"""The connector's `kv_connector_extra_config`, validated once at start-up.

A typo in a key or a wrong type would otherwise surface hours later as "my cache never hits", so
every key is checked here and an error names the key, what it got and what it accepts. Unknown
keys are errors too (a misspelt `store_pth` must not be ignored silently).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ucm.blend.config import BlendConfig, BlendConfigError
from ucm.connector.heads import MAX_SHARED_TP, MAX_TP_SIZES
from ucm.store.options import DURABILITIES
from ucm.window.config import WindowConfig, WindowConfigError

LOAD_MODES = ("sync", "async")


class ConfigError(ValueError):
    """`kv_connector_extra_config` is invalid; the message names the key and the accepted values."""


@dataclasses.dataclass(frozen=True)
class UCMConfig:
    store_path: str
    model_id: str
    model_revision: str = "main"
    capacity_bytes: int | None = None
    durability: str = "none"
    host_tier_bytes: int = 0
    load_mode: str = "sync"
    layerwise_save: bool = True
    cache_salt: str = ""
    direct_io: bool = False
    io_threads: int = 8
    max_tp_size: int = MAX_SHARED_TP  # largest TP size that must read the blocks (sets the head grouping)
    ucm_sparse_config: dict[str, Any] | None = None
    ucm_window_config: dict[str, Any] | None = None  # ReRoPE window extrapolation (ucm.window)
    ucm_blend_config: dict[str, Any] | None = None  # cache blend of stored chunks (ucm.blend)


_KEYS = {f.name for f in dataclasses.fields(UCMConfig)}
_PREFIX = "kv_connector_extra_config"


def _fail(key: str, got: object, expected: str) -> ConfigError:
    return ConfigError(f"{_PREFIX}.{key}: expected {expected}, got {got!r}")


def _int(extra: Mapping[str, Any], key: str, default: int | None, *, minimum: int, nullable: bool) -> int | None:
    value = extra.get(key, default)
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or null" if nullable else "")
        raise _fail(key, value, expected)
    return value


def _bool(extra: Mapping[str, Any], key: str, default: bool) -> bool:
    value = extra.get(key, default)
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _choice(extra: Mapping[str, Any], key: str, default: str, accepted: tuple[str, ...]) -> str:
    value = extra.get(key, default)
    if value not in accepted:
        raise _fail(key, value, "one of " + ", ".join(repr(a) for a in accepted))
    return str(value)


def _int_choice(extra: Mapping[str, Any], key: str, default: int, accepted: tuple[int, ...]) -> int:
    value = extra.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value not in accepted:
        raise _fail(key, value, "one of " + ", ".join(str(a) for a in accepted))
    return value


def _str(extra: Mapping[str, Any], key: str, default: str | None, *, empty_ok: bool = False) -> str:
    value = extra.get(key, default)
    if not isinstance(value, str) or (not value and not empty_ok):
        raise _fail(key, value, "a string" if empty_ok else "a non-empty string")
    return value


def parse_extra_config(extra: Mapping[str, Any] | None, *, default_model_id: str) -> UCMConfig:
    """Validate `kv_connector_extra_config`; `default_model_id` is vLLM's served model name."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - _KEYS)
    if unknown:
        raise ConfigError(
            f"{_PREFIX}: unknown key(s) {', '.join(unknown)}; accepted keys are {', '.join(sorted(_KEYS))}"
        )
    if "store_path" not in extra:
        raise ConfigError(f"{_PREFIX}.store_path is required: the directory of the shared UCM store")
    model_id = _str(extra, "model_id", default_model_id)
    if model_id.startswith(("/", "./", "../", "~")):
        raise _fail(
            "model_id", model_id,
            "a model name such as 'meta-llama/Llama-3.1-8B', not a local path (paths differ between "
            "hosts, so blocks would never be shared); set model_id when serving from a path",
        )
    sparse = extra.get("ucm_sparse_config")
    if sparse is not None and not isinstance(sparse, dict):
        raise _fail("ucm_sparse_config", sparse, "an object (mapping) or null")
    window = extra.get("ucm_window_config")
    if window is not None and not isinstance(window, dict):
        raise _fail("ucm_window_config", window, "an object (mapping) or null")
    if window is not None:
        try:
            WindowConfig.parse(window)
        except WindowConfigError as e:
            raise ConfigError(f"{_PREFIX}.{e}") from None
    blend = extra.get("ucm_blend_config")
    if blend is not None and not isinstance(blend, dict):
        raise _fail("ucm_blend_config", blend, "an object (mapping) or null")
    if blend is not None:
        try:
            BlendConfig.parse(blend)
        except BlendConfigError as e:
            raise ConfigError(f"{_PREFIX}.{e}") from None
    attention = [k for k, v in (("ucm_sparse_config", sparse), ("ucm_window_config", window),
                                ("ucm_blend_config", blend)) if v is not None]
    if len(attention) > 1:
        raise ConfigError(
            f"{_PREFIX}: {' and '.join(attention)} are all set; each replaces vLLM's attention through "
            "the one attention hook, so only one can be active per server"
        )
    return UCMConfig(
        store_path=_str(extra, "store_path", None),
        model_id=model_id,
        model_revision=_str(extra, "model_revision", "main"),
        capacity_bytes=_int(extra, "capacity_bytes", None, minimum=1, nullable=True),
        durability=_choice(extra, "durability", "none", DURABILITIES),
        host_tier_bytes=_int(extra, "host_tier_bytes", 0, minimum=0, nullable=False) or 0,
        load_mode=_choice(extra, "load_mode", "sync", LOAD_MODES),
        layerwise_save=_bool(extra, "layerwise_save", True),
        cache_salt=_str(extra, "cache_salt", "", empty_ok=True),
        direct_io=_bool(extra, "direct_io", False),
        io_threads=_int(extra, "io_threads", 8, minimum=1, nullable=False) or 8,
        max_tp_size=_int_choice(extra, "max_tp_size", MAX_SHARED_TP, MAX_TP_SIZES),
        ucm_sparse_config=sparse,
        ucm_window_config=window,
        ucm_blend_config=blend,
    )
