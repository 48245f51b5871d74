"""Prefix affinity: send prompts that share a prefix to the prefill pod whose GPU cache is warm.

The router has no tokenizer, so it cannot compute vLLM's own block hashes; it needs only a
stable key that is equal for equal prefixes. It hashes, with the store's `BlockHasher`:

* text prompts (and chat conversations rendered as `role\\x1fcontent\\x1e...`): the UTF-8 bytes,
  one byte per pseudo-token, in blocks of `TEXT_BLOCK_BYTES` (64 bytes ~ 16 real tokens);
* token-id prompts: the token ids themselves, in blocks of `TOKEN_BLOCK` (16, vLLM's default).

The key is the chained hash of the first `prefix_blocks` FULL blocks (the last hash of the chain
covers all of them). A prompt shorter than one block has no key and is balanced by load alone:
vLLM caches only full blocks, so there is nothing warm to aim for.

The key picks a prefill endpoint by rendezvous (highest-random-weight) hashing over the
revision's available prefill endpoints: adding or removing one pod moves only the keys that
pod wins, and every router replica makes the same choice without coordination.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import xxhash

from ucm.hashing import BlockHasher, CacheIdentity, KVGeometry

TEXT_BLOCK_BYTES = 64
TOKEN_BLOCK = 16
# The identity only namespaces the router's keys; no KV is ever stored under them.
_GEOMETRY = KVGeometry(num_layers=1, num_kv_heads=1, head_size=1)


class PrefixKeyer:
    """Computes the affinity key of a prompt prefix (see module docstring)."""

    def __init__(self, model: str, prefix_blocks: int = 16) -> None:
        if prefix_blocks <= 0:
            raise ValueError(f"prefix_blocks must be positive, got {prefix_blocks}")
        self.prefix_blocks = prefix_blocks
        self._text = BlockHasher(
            CacheIdentity(model, "router-text", "utf-8", _GEOMETRY, block_size=TEXT_BLOCK_BYTES)
        )
        self._tokens = BlockHasher(
            CacheIdentity(model, "router-tokens", "token-ids", _GEOMETRY, block_size=TOKEN_BLOCK)
        )

    @property
    def text_limit(self) -> int:
        """How many prompt bytes the key can depend on (the parser keeps no more)."""
        return self.prefix_blocks * TEXT_BLOCK_BYTES

    @property
    def token_limit(self) -> int:
        return self.prefix_blocks * TOKEN_BLOCK

    def key(self, text: bytes | None, tokens: Sequence[int] | None) -> bytes | None:
        if text is not None:
            data = text[: self.text_limit]
            # hash_blocks accepts an integer ndarray (no per-byte Python ints)
            hashes = self._text.hash_blocks(cast(Sequence[int], np.frombuffer(data, dtype=np.uint8)))
        elif tokens is not None:
            hashes = self._tokens.hash_blocks(tokens[: self.token_limit])
        else:
            return None
        return hashes[-1] if hashes else None


def rendezvous_weight(key: bytes, endpoint_id: str) -> int:
    """Highest-random-weight score of one endpoint for one key (deterministic across hosts)."""
    return xxhash.xxh3_64_intdigest(key + endpoint_id.encode())
