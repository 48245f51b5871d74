"""ReRoPE attention (Su, 2023): exact relative positions inside a window, clamped beyond it.

The formula, for a query at position i and a key at position j <= i, with d = i - j:
  d <  w : score = q_i . k_j with both rotated by their own positions (plain RoPE attention);
  d >= w : score as if the distance were w (ReRoPE) or w + (d - w) / leak (leaky ReRoPE).
Optionally every query is scaled by max(1, log(i + 1) / log(trained_length)) first, which keeps the
softmax as sharp at long contexts as it was in training. Inside the window nothing changes, so a
prompt no longer than `window` is served exactly as without ReRoPE.

Two implementations, kept apart on purpose:
- `reference_attention` is the formula as written: every (query, key) pair gets its own rotation by
  its clamped distance. Quadratic memory in rotations; only for tests.
- `rerope_attention` is what serving runs: two passes over the already-rotated q/k vLLM hands over.
  A far-pass score with clamped distance w + (d - w)/leak equals (R(i/leak + w(1 - 1/leak)) q) .
  (R(j/leak) k), so queries and keys are each re-rotated once (`RopeSpec.rerotate`) and the
  distance-dependent choice is a mask: near keys (d < w) from pass one, far keys from pass two.
  Queries are processed in chunks so the score matrix stays bounded at long contexts, and each
  chunk only touches the near band (w keys) plus the far prefix it can see.
Nothing extra is stored: the un-rotated (or 1/leak-rotated) K is re-derived from the cached K at read
time, since rotations are orthogonal. The store still must never mix ReRoPE and plain blocks (the
layers above the first see different hidden states), so `WindowConfig.identity` goes into the cache
identity whenever ReRoPE is on.
"""

from __future__ import annotations

import math

import torch

from ucm.window.config import WindowConfig
from ucm.window.rope import RopeSpec

QUERY_CHUNK = 512  # queries per score matrix: 9 heads x 512 x 32K keys x 4 B = 600 MB at most


def clamped_distance(config: WindowConfig, distance: torch.Tensor) -> torch.Tensor:
    """The distance a query-key pair at `distance` is scored as."""
    d = distance.to(torch.float64)
    w = config.window
    far = w + (d - w) / config.leak if config.leak is not None else torch.full_like(d, w)
    return torch.where(d < w, d, far)


def query_scale(config: WindowConfig, positions: torch.Tensor) -> torch.Tensor | None:
    """Per-query multipliers max(1, log(i + 1) / log(trained_length)), or None without log scaling."""
    if not config.log_scale or config.trained_length is None:
        return None
    factor = torch.log(positions.to(torch.float64) + 1) / math.log(config.trained_length)
    return factor.clamp(min=1.0)


def _group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, Hq, D] -> [T, Hkv, group, D] (grouped-query attention: query head h uses KV head h // group)."""
    t, hq, d = x.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    return x.reshape(t, num_kv_heads, hq // num_kv_heads, d)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
    rope: RopeSpec, config: WindowConfig, scale: float,
) -> torch.Tensor:
    """The formula, pair by pair, from UN-rotated `q` [Tq, Hq, D] and `k`, `v` [Tk, Hkv, D] with keys
    at positions 0..Tk-1: score(i, j) = scale * (R(clamped(i - j)) q_i) . k_j. Returns [Tq, Hq, D]."""
    hkv = k.shape[1]
    group = q.shape[1] // hkv
    kf, vf = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    factors = query_scale(config, q_positions)
    out = torch.empty(q.shape, dtype=torch.float64)
    key_positions = torch.arange(k.shape[0])
    for row in range(q.shape[0]):
        i = int(q_positions[row])
        visible = key_positions[: i + 1]
        distance = clamped_distance(config, i - visible)
        qi = q[row].double().expand(len(visible), *q.shape[1:])
        rotated = rope._apply(qi, rope.angles(distance.float()).double())  # [j, Hq, D]
        scores = (rotated * kf[: i + 1]).sum(-1) * scale  # [j, Hq]
        if factors is not None:
            scores = scores * factors[row]
        weights = torch.softmax(scores, dim=0)
        out[row] = (weights[:, :, None] * vf[: i + 1]).sum(0)
    return out.to(q.dtype)


def rerope_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
    rope: RopeSpec, config: WindowConfig, scale: float, chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """ReRoPE attention from the model's ROTATED `q` [Tq, Hq, D] (at `q_positions`, ascending) and
    rotated `k`, `v` [Tk, Hkv, D] at positions 0..Tk-1 (a request's whole sequence, as in the
    paged cache). Returns [Tq, Hq, D] in q's dtype; scores and softmax in float32.

    Why this shape of computation: on CPU it is bound by memory traffic over the score matrix, so
    each chunk's near and far scores are two batched matmuls with the query-head group folded into
    the rows (one matmul per KV head, no repeated K/V), softmax runs in place over both parts with a
    shared row maximum (no concatenation), and each part is multiplied with its V slice directly.
    """
    w, leak = config.window, config.leak
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    key_positions = torch.arange(k.shape[0], device=k.device)
    qpos = q_positions.to(k.device)
    if leak is None:
        far_k = rope.rerotate(k, key_positions, torch.zeros_like(key_positions))
        far_q = rope.rerotate(q, qpos, torch.full_like(qpos, w))
    else:
        far_k = rope.rerotate(k, key_positions, key_positions / leak)
        far_q = rope.rerotate(q, qpos, qpos / leak + w * (1 - 1 / leak))
    factors = query_scale(config, qpos)
    near_q, far_q = q.float() * scale, far_q.float() * scale
    if factors is not None:
        near_q = near_q * factors.float()[:, None, None]
        far_q = far_q * factors.float()[:, None, None]

    def by_kv_head(x: torch.Tensor) -> torch.Tensor:  # [T, Hq, D] -> [Hkv, T, group, D]
        return _group(x, hkv).permute(1, 0, 2, 3).contiguous()

    near_q, far_q = by_kv_head(near_q), by_kv_head(far_q)
    keys_t = k.float().permute(1, 2, 0).contiguous()  # [Hkv, D, Tk]
    far_keys_t = far_k.float().permute(1, 2, 0).contiguous()
    values = v.float().transpose(0, 1).contiguous()  # [Hkv, Tk, D]
    out = torch.empty(hkv, tq, group, d, dtype=torch.float32, device=q.device)
    for start in range(0, tq, chunk):
        stop = min(start + chunk, tq)
        rows = (stop - start) * group
        pos = qpos[start:stop]
        first, last = int(pos[0]), int(pos[-1])
        near_lo, near_hi = max(0, first - w + 1), last + 1
        far_hi = max(0, last - w + 1)
        near = torch.bmm(near_q[:, start:stop].reshape(hkv, rows, d), keys_t[:, :, near_lo:near_hi])
        near = near.view(hkv, stop - start, group, near_hi - near_lo)
        dist = pos[:, None] - key_positions[None, near_lo:near_hi]
        near.masked_fill_(~((dist >= 0) & (dist < w))[None, :, None, :], float("-inf"))
        row_max = near.amax(-1, keepdim=True)
        far = None
        if far_hi:
            far = torch.bmm(far_q[:, start:stop].reshape(hkv, rows, d), far_keys_t[:, :, :far_hi])
            far = far.view(hkv, stop - start, group, far_hi)
            far.masked_fill_(~((pos[:, None] - key_positions[None, :far_hi]) >= w)[None, :, None, :], float("-inf"))
            row_max = torch.maximum(row_max, far.amax(-1, keepdim=True))
        near.sub_(row_max).exp_()
        denominator = near.sum(-1, keepdim=True)
        result = torch.bmm(near.view(hkv, rows, -1), values[:, near_lo:near_hi]).view(hkv, stop - start, group, d)
        if far is not None:
            far.sub_(row_max).exp_()
            denominator = denominator + far.sum(-1, keepdim=True)
            result.add_(torch.bmm(far.view(hkv, rows, -1), values[:, :far_hi]).view(hkv, stop - start, group, d))
        out[:, start:stop] = result.div_(denominator)
    return out.permute(1, 0, 2, 3).reshape(tq, hq, d).to(q.dtype)
