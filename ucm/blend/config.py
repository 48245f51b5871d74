"""`ucm_blend_config`: cache blend's parameters, validated without torch.

Why its own module: the connector validates its whole extra config at start-up, on the scheduler
side too, where torch is not loaded (tests/test_import_boundaries.py).

Why the separator is given as token ids: a chunk is found by matching its separator in the prompt's
token ids, and a string tokenizes differently depending on what precedes it (BPE merges across the
boundary), so a string would silently match nothing. Applications build RAG prompts by
concatenating separately tokenized passages and separator ids, which is also what makes a passage's
tokens identical wherever it appears.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

SECTION = "ucm_blend_config"
_KEYS = {"separator_ids", "recompute_ratio", "check_layer"}
DEFAULT_RATIO = 0.15
DEFAULT_CHECK_LAYER = 1


class BlendConfigError(ValueError):
    """`ucm_blend_config` is not valid; the message names the key and what was expected."""


@dataclasses.dataclass(frozen=True)
class BlendConfig:
    """`separator_ids`: the token ids that end every chunk; `recompute_ratio`: the share of each
    reused chunk's tokens recomputed from `check_layer` on (the ones whose K deviates most there)."""

    separator_ids: tuple[int, ...]
    recompute_ratio: float = DEFAULT_RATIO
    check_layer: int = DEFAULT_CHECK_LAYER

    def __post_init__(self) -> None:
        ids = self.separator_ids
        if not ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise BlendConfigError(
                f"{SECTION}.separator_ids: expected a non-empty list of token ids (integers >= 0), got {list(ids)!r}"
            )
        ratio = self.recompute_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise BlendConfigError(f"{SECTION}.recompute_ratio: expected a number in [0, 1], got {ratio!r}")
        layer = self.check_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise BlendConfigError(
                f"{SECTION}.check_layer: expected an integer >= 0 (the layer whose K deviation selects the "
                f"tokens to recompute; 1 is the first whose K depends on context), got {layer!r}"
            )

    @classmethod
    def parse(cls, raw: Mapping[str, object]) -> BlendConfig:
        """Validate the connector's `ucm_blend_config` object; unknown keys are refused by name."""
        if not isinstance(raw, Mapping):
            raise BlendConfigError(f"{SECTION}: expected an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise BlendConfigError(f"{SECTION}.{unknown[0]}: unknown key; accepted keys: {', '.join(sorted(_KEYS))}")
        if "separator_ids" not in raw:
            raise BlendConfigError(
                f"{SECTION}.separator_ids: required (the token ids that end each chunk, e.g. the ids of "
                "the separator string as your tokenizer encodes it between passages)"
            )
        ids = raw["separator_ids"]
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if not isinstance(ids, (list, tuple)):
            raise BlendConfigError(f"{SECTION}.separator_ids: expected a list of token ids, got {ids!r}")
        ratio = raw.get("recompute_ratio", DEFAULT_RATIO)
        return cls(
            separator_ids=tuple(ids),  # type: ignore[arg-type]  # checked in __post_init__
            recompute_ratio=float(ratio) if isinstance(ratio, int) and not isinstance(ratio, bool) else ratio,  # type: ignore[arg-type]
            check_layer=raw.get("check_layer", DEFAULT_CHECK_LAYER),  # type: ignore[arg-type]
        )

    def identity(self) -> str:
        """What goes into the cache identity. A blend pool saves blended (approximate) KV back under
        plain prefix keys, so its blocks live apart from exact pools' blocks; the ratio and check
        layer are not part of it: any blend pool's approximation is as good a prefix hit as another's."""
        return "blend"
