"""Which parts of a prompt cache blend reuses, planned on the scheduler side (no torch).

A prompt is split by the separator into prefix | chunk | ... | chunk | suffix: the prefix is
everything up to and including the first separator (its KV is genuinely computed from position 0,
so it loads as an ordinary prefix hit), every later run of tokens ending in a separator is a chunk,
and what follows the last separator (the question) is the suffix, always computed.

A chunk's stored KV is its KV computed on its own, at positions 0..n-1, keyed by a hash chain that
starts afresh at the chunk's first token. That chain is exactly the prefix chain of a prompt that
*begins* with the chunk, so a chunk is stored by any request that starts with it (e.g. the passage
sent alone once, when a RAG index is built) through the connector's ordinary save path; no second
copy, no second format. Only whole chunk-relative blocks are reused: a chunk's trailing partial
block (and any block the store lacks, and everything after it in that chunk) is recomputed.

Blend needs every token of the request in one forward pass (the selection at the check layer picks
among all of them), so a request whose prompt vLLM splits into several chunked-prefill steps is not
blended (it still gets its prefix hit); the caller counts those.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class ReusedChunk:
    """A chunk of a request whose leading blocks the store holds."""

    start: int  # prompt position of the chunk's first token (its stored KV sits at 0..)
    block_hashes: tuple[bytes, ...]  # the stored blocks, chunk-relative blocks 0..len-1

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_hashes) * block_size


@dataclasses.dataclass(frozen=True)
class BlendRequest:
    """One request's plan for this step: its physical KV blocks and the chunks it reuses."""

    req_id: str
    block_ids: tuple[int, ...]  # the request's KV blocks: token t's slot is block_ids[t // bs] * bs + t % bs
    chunks: tuple[ReusedChunk, ...]
    recompute_ratio: float  # the server's, or the request's own (kv_transfer_params)


@dataclasses.dataclass(frozen=True)
class BlendStep:
    """What the workers get with a step's connector metadata (`sparse_meta`)."""

    requests: tuple[BlendRequest, ...]


def separator_ends(token_ids: Sequence[int], separator: Sequence[int]) -> list[int]:
    """Positions just after each (non-overlapping) occurrence of `separator` in `token_ids`."""
    sep = list(separator)
    width, first = len(sep), sep[0]
    ends: list[int] = []
    tokens = list(token_ids)
    i = 0
    while True:
        try:
            i = tokens.index(first, i)
        except ValueError:
            return ends
        if tokens[i : i + width] == sep:
            i += width
            ends.append(i)
        else:
            i += 1


def chunk_spans(token_ids: Sequence[int], separator: Sequence[int], first_token: int = 0) -> list[tuple[int, int]]:
    """[start, end) of every chunk (separator included) that starts at or after `first_token` (the
    tokens before it are already computed: prefix hits) and ends before the prompt's last token
    (which vLLM always computes, to sample from it)."""
    ends = separator_ends(token_ids, separator)
    last = len(token_ids) - 1
    return [(a, b) for a, b in itertools.pairwise(ends) if a >= first_token and b <= last]


ChunkLookup = Callable[[Sequence[tuple[int, int]]], Sequence[Sequence[bytes]]]


def plan_request(
    req_id: str, prompt_ids: Sequence[int], block_ids: Sequence[int], num_computed: int, separator: Sequence[int],
    recompute_ratio: float, lookup: ChunkLookup,
) -> BlendRequest | None:
    """The request's plan, or None when no chunk of it is stored. `lookup(spans)` returns, per
    span, the hashes of its leading whole blocks that the store holds (one batched store lookup)."""
    spans = chunk_spans(prompt_ids, separator, num_computed)
    if not spans:
        return None
    chunks = tuple(
        ReusedChunk(start, tuple(hashes)) for (start, _end), hashes in zip(spans, lookup(spans), strict=True) if hashes
    )
    if not chunks:
        return None
    return BlendRequest(req_id, tuple(block_ids), chunks, recompute_ratio)
