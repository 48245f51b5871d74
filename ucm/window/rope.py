"""The model's rotary position embedding (RoPE), as plain torch, at any (even fractional) position.

Why our own: ReRoPE needs rotations vLLM's model never applies — a query rotated to the window
distance, keys rotated back to position 0 (or, leaky, to position/k). Attention receives q and k
already rotated by their own positions; rotations compose (R(a) R(b) = R(a + b)) and are orthogonal,
so every rotation ReRoPE needs is one more rotation of what vLLM hands over, by a difference of
positions. That is exact as long as this rotation is the model's: same frequencies
(theta ** (-2i / rotary_dim)) and the same pairing of dimensions (NeoX halves or GPT-J interleaved).
Models whose RoPE is not that — partial rotary, any rope scaling (YaRN, NTK, Llama-3 frequency
rescaling), M-RoPE — are refused by `RopeSpec.from_hf_config`, naming what was found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


class RopeUnsupported(ValueError):
    """The model's position embedding is not plain full-width RoPE; the message says what it is."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Plain RoPE over the whole head: `theta` base, `head_dim` rotated dims, NeoX or GPT-J pairing."""

    theta: float
    head_dim: int
    neox: bool = True

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise RopeUnsupported(f"RoPE head_dim must be a positive even number, got {self.head_dim}")
        if not self.theta > 0:
            raise RopeUnsupported(f"RoPE theta must be positive, got {self.theta}")

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeSpec:
        """The spec of a Hugging Face model config (vLLM's `model_config.hf_config`), or
        `RopeUnsupported` naming the field that makes re-rotation inexact."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = getattr(config, "partial_rotary_factor", 1.0)
        if partial not in (None, 1, 1.0):
            raise RopeUnsupported(f"partial_rotary_factor={partial}: only full-width RoPE can be re-rotated")
        params: Mapping[str, Any] = getattr(config, "rope_parameters", None) or {}
        legacy = getattr(config, "rope_scaling", None)
        if isinstance(legacy, Mapping) and legacy and not params:
            params = legacy
        rope_type = str(params.get("rope_type", params.get("type", "default")))
        if rope_type != "default":
            raise RopeUnsupported(
                f"rope_type={rope_type!r} ({dict(params)}): ReRoPE re-rotates with plain RoPE frequencies, "
                "so scaled RoPE cannot be expressed; serve the model without rope scaling"
            )
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise RopeUnsupported("rope_theta: not found in the model config (rope_parameters or rope_theta)")
        return cls(theta=float(theta), head_dim=int(head_dim), neox=True)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """[tokens, head_dim/2] rotation angles, computed as vLLM's (and Hugging Face's) rotary
        tables are: float32 inverse frequencies times float32 positions. Re-rotating by differences
        of these exact angles undoes the model's own rotation to the last bit of its table, where
        float64 angles would leave ~1e-3 rad at 32K positions."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device)
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        return positions.to(torch.float32)[:, None] * inv_freq[None, :]

    def rerotate(self, x: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor) -> torch.Tensor:
        """`x` [tokens, heads, head_dim], rotated by the model at `from_positions` [tokens], as if it
        had been rotated at `to_positions` instead (float positions allowed: leaky ReRoPE)."""
        delta = self.angles(to_positions).to(torch.float64) - self.angles(from_positions).to(torch.float64)
        return self._apply(x, delta)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Un-rotated `x` [tokens, heads, head_dim] rotated at `positions` [tokens], as the model does."""
        return self._apply(x, self.angles(positions))

    def _apply(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        cos = torch.cos(angles).to(x.dtype)[:, None, :]
        sin = torch.sin(angles).to(x.dtype)[:, None, :]
        if self.neox:
            x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2:]
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
