"""The tensor math of block retrieval: per-block key summaries, query scores, selection, attention.

Pure functions over plain tensors so the same code serves the offline benchmark, the tests and the
vLLM worker hooks. Layout used throughout ("block-major per KV head"):

  keys, values: [num_kv_heads, num_blocks, block_size, head_dim]  (the last block may be partial;
                `num_tokens` says how many leading token slots are valid)
  query:        [num_q_heads, head_dim] (one decode token; q heads of a GQA group are contiguous)

Why block granularity: KV lives in fixed-size blocks (vLLM's paged cache, the store's objects), so
selecting whole blocks is what lets unselected KV stay off the GPU and out of the read path.

Why the Quest bound: for a block with per-channel key minima m and maxima M, every key k in it has
q.k <= sum_d max(q_d m_d, q_d M_d). Ranking blocks by that upper bound never ranks a block below its
true best key's score, so a block holding one strongly matching "needle" token is found even if its
mean key is unremarkable. The mean summary (q . mean(k)) is cheaper (one vector) but can miss that.

Why "mass" (the default): what decides the output error is each block's share of the softmax, per
query head, and that share is decided by the block's best-matching keys (ranking blocks by their
exact best logit does as well as the oracle). "mass" estimates the best logit from four key
centres per block (4-means over the block's keys, started from the first key and then the
farthest ones) and each centre's radius (the farthest member): max over centres of
q.c + 0.25 |q| r. It turns that into a share of attention per query head (softmax over blocks at
the attention scale) and sums the shares over the query heads of a GQA group: a head with flat
attention spreads its share thinly and barely moves the ranking, a peaked head's few blocks win,
where raw scores compared across heads are not on one scale.

Why four centres, in int8: the estimate of a block's best logit is what limits accuracy, and more
centres estimate it better (tiny_lm, 25% keep, one selection per vLLM row, seeds 0 / 1: cosine
0.9861 / 0.9932 with two centres, 0.990 / 0.994 with three, 0.993 / 0.996 with four, 0.995 / 0.998
with six). Centres are stored as int8 codes with one scale per centre (the largest |channel| is
exact, the rest within 1/254 of it; the same accuracy as float centres to 0.0005), which makes
four centres cheaper than two float ones: per block and KV head D bytes per centre plus a scale and
a radius in the cache dtype — 160 B against 4096 B of K+V for a float32 cache with 32-dim heads in
16-token blocks (3.9% of the KV cache; 7.0% for a bf16 cache, 6.4% for bf16 with 128-dim heads),
where two float centres took 6.4% at any dtype. Every scoring pass reads all of it, so it counts
in the bytes read per step.

Measured (tiny_lm, 25% keep, re-selected every step; seeds 0, 1 tuned on, seed 2 held out): per KV
head 0.9974 / 0.9972 / 0.9971, one selection per vLLM row 0.9941 / 0.9958 / 0.9962, both at 3.5x
fewer KV bytes read than dense, summaries included (two float centres: 0.9955 / 0.9957 / 0.9918 and
0.9861 / 0.9932 / 0.9891 at 3.2x). Earlier choices on the same models: the softmax share from
per-channel min/max bounds (centre + 0.25 slack) reached 0.992 / 0.976 per KV head and the Quest
bound alone 0.963 / 0.961; the radius weight was picked on seeds 0 and 1 with two centres (0.1 and
0.4 within 0.003) and kept.
"""

from __future__ import annotations

import dataclasses
import math

import torch

SUMMARY_KINDS = ("bounds", "mean", "mass")
SUMMARY_FIELDS = {"bounds": ("kmin", "kmax"), "mean": ("kmean",), "mass": ("codes", "scales", "radii")}
RADIUS_WEIGHT = 0.25  # weight of a centre's radius in the "mass" estimate of a block's best logit
CENTRES = 4  # key centres per block for "mass"
CODE_MAX = 127  # int8 centre codes: a centre is codes / CODE_MAX * its scale


@dataclasses.dataclass
class BlockSummaries:
    """Per-block key summaries: kmin/kmax/kmean [num_kv_heads, num_blocks, head_dim]; for "mass"
    the int8 codes of the key centres [H, NB, CENTRES, head_dim], each centre's scale (its largest
    |channel|) and radius [H, NB, CENTRES]. Only the fields of one summary kind are filled; the
    others have size 0 in their last dimension (no memory)."""

    kmin: torch.Tensor
    kmax: torch.Tensor
    kmean: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    radii: torch.Tensor

    FIELDS = ("kmin", "kmax", "kmean", "codes", "scales", "radii")

    @classmethod
    def empty(
        cls, kind: str, heads: int, num_blocks: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> BlockSummaries:
        """Zeroed storage for `num_blocks` blocks, holding only what `kind` scores from (centre codes
        in int8, every other field in `dtype`)."""
        used = SUMMARY_FIELDS[kind]
        shapes = {"kmin": (head_dim,), "kmax": (head_dim,), "kmean": (head_dim,),
                  "codes": (CENTRES, head_dim), "scales": (CENTRES,), "radii": (CENTRES,)}
        return cls(**{f: torch.zeros(heads, num_blocks, *(shapes[f] if f in used else (0,) * len(shapes[f])),
                                     dtype=torch.int8 if f == "codes" else dtype, device=device)
                      for f in cls.FIELDS})

    @property
    def num_blocks(self) -> int:
        return int(self.kmin.shape[1])

    @property
    def centres(self) -> torch.Tensor:
        """[H, NB, CENTRES, head_dim] the key centres decoded to float32 (a new tensor, not a view)."""
        return self.codes.float() / CODE_MAX * self.scales.float()[..., None]

    def take(self, index: torch.Tensor | slice) -> BlockSummaries:
        """The summaries of blocks `index` (a slice or a tensor of block indices)."""
        return BlockSummaries(**{f: getattr(self, f)[:, index] for f in self.FIELDS})

    def assign(self, index: torch.Tensor | slice, src: BlockSummaries) -> None:
        """Write `src`'s filled fields into blocks `index`."""
        for f in self.FIELDS:
            dst = getattr(self, f)
            if dst.numel():
                dst[:, index] = getattr(src, f).to(dst.dtype)

    def nbytes(self, kind: str) -> int:
        """Bytes a scoring pass of `kind` reads."""
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in SUMMARY_FIELDS[kind])


def encode_centres(centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float centres [..., head_dim] -> (int8 codes, scales [...]): symmetric per-centre scaling by
    the largest |channel|, so the largest channel is stored exactly and the rest to 1/254 of it."""
    scales = centres.abs().amax(dim=-1)
    codes = torch.round(centres / scales.clamp(min=torch.finfo(torch.float32).tiny)[..., None] * CODE_MAX)
    return codes.to(torch.int8), scales


def token_valid_mask(num_blocks: int, block_size: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """[num_blocks, block_size] True where a slot holds a real token (the tail block may be partial)."""
    pos = torch.arange(num_blocks * block_size, device=device).view(num_blocks, block_size)
    return pos < num_tokens


def build_block_summaries(keys: torch.Tensor, num_tokens: int, kind: str = "mass") -> BlockSummaries:
    """`kind`'s summaries of every block of `keys` [H, NB, bs, D]; padding slots of a partial tail
    are ignored."""
    if kind not in SUMMARY_KINDS:
        raise ValueError(f"summary kind: expected one of {SUMMARY_KINDS}, got {kind!r}")
    heads, num_blocks, block_size, head_dim = keys.shape
    valid = token_valid_mask(num_blocks, block_size, num_tokens, keys.device)[None, :, :, None]
    k = keys.float()
    out = BlockSummaries.empty(kind, heads, num_blocks, head_dim, torch.float32, keys.device)
    if kind == "bounds":
        out.kmin = k.masked_fill(~valid, math.inf).amin(dim=2)
        out.kmax = k.masked_fill(~valid, -math.inf).amax(dim=2)
    elif kind == "mean":
        out.kmean = k.masked_fill(~valid, 0.0).sum(dim=2) / valid.sum(dim=2).clamp(min=1)
    else:
        centres, out.radii = _key_centres(k, valid[..., 0])
        out.codes, out.scales = encode_centres(centres)
    return BlockSummaries(**{f: getattr(out, f).to(torch.int8 if f == "codes" else keys.dtype)
                             for f in BlockSummaries.FIELDS})


def _key_centres(k: torch.Tensor, valid: torch.Tensor, iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """CENTRES-means of each block's valid keys ([H, NB, bs, D], valid [1, NB, bs]): centres
    [H, NB, CENTRES, D] and radii [H, NB, CENTRES] (farthest member). Deterministic start: the first
    key, then repeatedly the valid key farthest from the centres so far (so an outlying "needle" key
    gets a centre of its own); a centre left without members keeps its place (radius 0)."""
    heads, nb, bs, d = k.shape
    valid = valid.expand(heads, nb, bs)
    centres = k[:, :, :1]
    while centres.shape[2] < CENTRES:
        nearest = torch.cdist(k.reshape(-1, bs, d), centres.reshape(-1, centres.shape[2], d)).amin(dim=-1)
        far = nearest.view(heads, nb, bs).masked_fill(~valid, -1.0).argmax(dim=2)  # [H, NB]
        centres = torch.cat([centres, k.gather(2, far[..., None, None].expand(heads, nb, 1, d))], dim=2)
    for step in range(iterations + 1):
        dist = torch.cdist(k.reshape(-1, bs, d), centres.reshape(-1, CENTRES, d)).view(heads, nb, bs, CENTRES)
        member = torch.nn.functional.one_hot(dist.argmin(dim=-1), CENTRES).to(k.dtype) * valid[..., None]
        count = member.sum(dim=2)  # [H, NB, CENTRES]
        if step < iterations:
            moved = torch.einsum("hnbr,hnbd->hnrd", member, k) / count.clamp(min=1)[..., None]
            centres = torch.where(count[..., None] > 0, moved, centres)
    radii = (dist * member).amax(dim=2)
    return centres, radii


def query_head_scores(
    query: torch.Tensor, summaries: BlockSummaries, kind: str, scale: float | None = None
) -> torch.Tensor:
    """[num_kv_heads, group, num_blocks] block scores per query head (higher = keep): the summary
    score for "bounds" and "mean", the estimated attention share for "mass". `scale` is the
    attention's softmax scale (default head_dim ** -0.5)."""
    if kind not in SUMMARY_KINDS:
        raise ValueError(f"summary kind: expected one of {SUMMARY_KINDS}, got {kind!r}")
    num_kv_heads, head_dim = summaries.kmin.shape[0], query.shape[-1]
    group = query.shape[0] // num_kv_heads
    q = query.float().view(num_kv_heads, group, head_dim)
    if kind == "mean":
        return torch.einsum("hgd,hnd->hgn", q, summaries.kmean.float())
    if kind == "bounds":
        ub = torch.einsum("hgd,hnd->hgn", q.clamp(min=0), summaries.kmax.float())
        return ub + torch.einsum("hgd,hnd->hgn", q.clamp(max=0), summaries.kmin.float())
    # q.c from the codes, scaled afterwards: one pass over the codes, none over decoded centres
    near = torch.einsum("hgd,hnrd->hgnr", q, summaries.codes.float())
    near *= (summaries.scales.float() / CODE_MAX)[:, None]
    near += RADIUS_WEIGHT * q.norm(dim=-1)[:, :, None, None] * summaries.radii.float()[:, None]
    return (near.amax(dim=-1) * (head_dim**-0.5 if scale is None else scale)).softmax(dim=-1)


def _merge_heads(scores: torch.Tensor, kind: str, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Shares ("mass") add up across query heads; raw scores are not on one scale, so the max."""
    return scores.sum(dim=dim) if kind == "mass" else scores.amax(dim=dim)


def score_blocks(
    query: torch.Tensor, summaries: BlockSummaries, kind: str, scale: float | None = None
) -> torch.Tensor:
    """[num_kv_heads, num_blocks] block scores for one decode query (higher = keep): for "bounds" and
    "mean" the max over each GQA group's q heads, for "mass" the estimated attention share summed
    over the group. `scale` is the attention's softmax scale (default head_dim ** -0.5)."""
    return _merge_heads(query_head_scores(query, summaries, kind, scale), kind, dim=1)


def shared_block_scores(
    query: torch.Tensor, summaries: BlockSummaries, kind: str, init_end: int, local_start: int, count: int,
    scale: float | None = None,
) -> torch.Tensor:
    """[1, num_blocks] scores for ONE selection of `count` middle blocks shared by every KV head (a
    vLLM block-table row): merged over all query heads, except that each query head's own best
    `count // (2 * num_q_heads)` middle blocks rank first.

    Why the guarantee: the estimated shares rank blocks well within a head, but across heads one
    head's over-confident estimate can take most of the budget in a plain sum (true block maxima
    summed that way reach the oracle; the estimates do not). Reserving half the budget by each
    head's own ranking measured better at 10/25/50% keep on all three tiny_lm seeds (25%: 0.9846 /
    0.9925 / 0.9856 -> 0.9861 / 0.9932 / 0.9891, with two float centres per block).

    The row's last block is left out of the shares when it is in the local window (always kept):
    a paged summary covers every slot of its block, and the tail's unwritten slots hold whatever
    the block held before (another request's keys after a reuse), which must not move the
    normaliser of the other blocks' shares."""
    scored = summaries.take(slice(0, max(summaries.num_blocks - 1, local_start)))
    per_head = query_head_scores(query, scored, kind, scale)
    merged = per_head.new_zeros(summaries.num_blocks)
    merged[: scored.num_blocks] = _merge_heads(per_head, kind, dim=(0, 1))
    heads = per_head.shape[0] * per_head.shape[1]
    guaranteed = rank_middle(per_head.reshape(heads, -1), init_end, local_start, count // (2 * heads))
    merged[guaranteed.reshape(-1)] = merged.max() + 1.0
    return merged[None]


def num_blocks_to_keep(num_blocks: int, keep_ratio: float, init_blocks: int, local_blocks: int) -> int:
    """How many blocks a decode step attends to: ceil(ratio * blocks), at least the fixed windows."""
    return min(num_blocks, max(init_blocks + local_blocks, math.ceil(keep_ratio * num_blocks)))


def fixed_window(num_blocks: int, init_blocks: int, local_blocks: int) -> tuple[range, range]:
    """The always-kept initial window and local (most recent) window, disjoint."""
    init = range(min(init_blocks, num_blocks))
    local = range(max(len(init), num_blocks - local_blocks), num_blocks)
    return init, local


def row_local_start(num_blocks: int, first_query_block: int, init_blocks: int, local_blocks: int) -> int:
    """Where a request row's always-kept local window starts: the blocks its queries sit in, plus the
    `local_blocks - 1` before the first of them. For a decode row (one query, in the last block) this
    is the decode local window of `fixed_window`; a prefill chunk keeps all of its own blocks (their
    queries attend to them causally) and never starts inside the initial window."""
    start = min(num_blocks - local_blocks, first_query_block - local_blocks + 1)
    return max(min(init_blocks, num_blocks), start)


def rank_middle(scores: torch.Tensor, init_end: int, local_start: int, count: int) -> torch.Tensor:
    """[H, count'] indices of the best-scoring middle blocks [init_end, local_start), best first."""
    middle = scores[:, init_end:local_start]
    count = max(0, min(count, middle.shape[1]))
    return middle.topk(count, dim=1).indices + init_end


def retrieve_top_k(scores: torch.Tensor, init_end: int, local_start: int, k: int) -> torch.Tensor:
    """[H, k'] top-k block indices per head among the middle blocks [init_end, local_start), sorted."""
    return rank_middle(scores, init_end, local_start, k).sort(dim=1).values


def compose_selection(
    retrieved: torch.Tensor, num_blocks: int, init_blocks: int, local_blocks: int
) -> torch.Tensor:
    """[H, K] sorted selection: initial window + retrieved blocks + the current local window.

    Retrieved blocks lie between the two windows at retrieval time, and the local window only moves
    forward as the sequence grows, so a reused (stride) retrieval stays disjoint from both windows.
    """
    heads = retrieved.shape[0]
    init, local = fixed_window(num_blocks, init_blocks, local_blocks)
    device = retrieved.device
    fixed = torch.tensor(list(init) + list(local), dtype=torch.long, device=device)
    parts = torch.cat([fixed.expand(heads, -1), retrieved.to(torch.long)], dim=1)
    return parts.sort(dim=1).values


def select_blocks(
    query: torch.Tensor,
    summaries: BlockSummaries,
    *,
    keep_ratio: float,
    init_blocks: int,
    local_blocks: int,
    kind: str = "mass",
) -> torch.Tensor:
    """One fresh selection [H, K] for `query` (no stride state): windows + top-k by summary score."""
    nb = summaries.num_blocks
    keep = num_blocks_to_keep(nb, keep_ratio, init_blocks, local_blocks)
    init, local = fixed_window(nb, init_blocks, local_blocks)
    k = keep - len(init) - len(local)
    retrieved = retrieve_top_k(score_blocks(query, summaries, kind), init.stop, local.start, k)
    return compose_selection(retrieved, nb, init_blocks, local_blocks)


def dense_decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_tokens: int, scale: float
) -> torch.Tensor:
    """Reference attention of one decode query over every valid token: [num_q_heads, head_dim]."""
    heads, nb, bs, d = keys.shape
    group = query.shape[0] // heads
    q = query.float().view(heads, group, d)
    logits = torch.einsum("hgd,htd->hgt", q, keys.float().reshape(heads, nb * bs, d)) * scale
    logits[..., num_tokens:] = -math.inf
    probs = logits.softmax(dim=-1)
    out = torch.einsum("hgt,htd->hgd", probs, values.float().reshape(heads, nb * bs, values.shape[-1]))
    return out.reshape(heads * group, values.shape[-1])


def block_attention_mass(
    query: torch.Tensor, keys: torch.Tensor, num_tokens: int, scale: float
) -> torch.Tensor:
    """[num_kv_heads, num_blocks] true softmax mass of each block, summed over each group's q heads
    (the ground truth that selection recall is measured against)."""
    heads, nb, bs, d = keys.shape
    group = query.shape[0] // heads
    q = query.float().view(heads, group, d)
    logits = torch.einsum("hgd,htd->hgt", q, keys.float().reshape(heads, nb * bs, d)) * scale
    logits[..., num_tokens:] = -math.inf
    return logits.softmax(dim=-1).view(heads, group, nb, bs).sum(dim=(1, 3))


def gather_blocks(blocks: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[H, K, bs, D] the selected blocks of `blocks` [H, NB, bs, D], per head."""
    head_index = torch.arange(blocks.shape[0], device=blocks.device)[:, None]
    return blocks[head_index, selected]


def sparse_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_tokens: int,
    selected: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one decode query over the selected blocks only: [num_q_heads, head_dim].

    Reads only the selected blocks' K and V (gathered per KV head), never the rest.
    """
    return attention_over_gathered(
        query, gather_blocks(keys, selected), gather_blocks(values, selected), selected, num_tokens, scale
    )


def attention_over_gathered(
    query: torch.Tensor,
    k_sel: torch.Tensor,
    v_sel: torch.Tensor,
    selected: torch.Tensor,
    num_tokens: int,
    scale: float,
) -> torch.Tensor:
    """Softmax attention over already gathered blocks k_sel/v_sel [H, K, bs, D] (selected: [H, K])."""
    heads, k_blocks, bs, d = k_sel.shape
    group = query.shape[0] // heads
    q = query.float().view(heads, group, d)
    pos = selected[:, :, None] * bs + torch.arange(bs, device=selected.device)
    valid = (pos < num_tokens).view(heads, 1, k_blocks * bs)
    logits = torch.einsum("hgd,htd->hgt", q, k_sel.float().reshape(heads, k_blocks * bs, d)) * scale
    logits = logits.masked_fill(~valid, -math.inf)
    probs = logits.softmax(dim=-1)
    out = torch.einsum("hgt,htd->hgd", probs, v_sel.float().reshape(heads, k_blocks * bs, v_sel.shape[-1]))
    return out.reshape(heads * group, v_sel.shape[-1])


def kv_bytes_of_blocks(selected: torch.Tensor, keys: torch.Tensor, num_tokens: int) -> int:
    """Bytes of K and V an attention over `selected` [H, K] reads (valid tokens only)."""
    _, _, bs, d = keys.shape
    pos = selected[:, :, None] * bs + torch.arange(bs, device=selected.device)
    tokens = int((pos < num_tokens).sum())
    return 2 * tokens * d * keys.element_size()


def to_block_major(tokens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """[N, H, D] token-major K or V -> ([H, NB, bs, D] zero-padded, N)."""
    n, heads, d = tokens.shape
    nb = math.ceil(n / block_size)
    out = tokens.new_zeros(heads, nb * block_size, d)
    out[:, :n] = tokens.transpose(0, 1)
    return out.view(heads, nb, block_size, d), n
