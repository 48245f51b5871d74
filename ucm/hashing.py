"""Block identity: what names one token block's KV in the store.

A block's hash is a chain: block *i* hashes the identity digest, the hash of block *i-1* and
its own token ids, so equal hashes mean equal prefixes. The identity digest covers everything
that changes the KV bytes (model name and revision — never a local path, so two mounts of one
model share blocks — dtype, KV geometry, tokens per block, and an optional per-tenant salt).

Why these choices:

* Determinism across processes, hosts and Python versions: every input is encoded canonically
  (sorted-key ASCII JSON for the identity, little-endian int32 for tokens) and hashed with
  xxh3_128, never with `hash()` (which depends on PYTHONHASHSEED) or pickle.
* Speed: vLLM hashes every prompt on the scheduler's critical path; xxh3_128 over one 96-byte
  buffer per block keeps the Python loop at a few hundred nanoseconds per block (>= 25 M
  tokens/s at 16 tokens per block; measured by `ucm store bench`).
* 128 bits: collisions across a shared multi-tenant store must be negligible.
* The KV-head group is part of the *store key* (`block_key`), not of the block hash, so pools
  with different tensor-parallel sizes compute the same block hashes and can share blocks by
  reading the head ranges they need.
"""

from __future__ import annotations

import array
import dataclasses
import json
import struct
import sys
from collections.abc import Sequence

import numpy as np
import xxhash

HASH_BYTES = 16
KEY_BYTES = HASH_BYTES + 4
_IDENTITY_VERSION = "ucm-identity-v1"
_ROOT_PARENT = b"\x00" * HASH_BYTES
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_HEAD_GROUP = struct.Struct("<HH")
_BIG_ENDIAN = sys.byteorder == "big"
assert array.array("i").itemsize == 4, "int32 token encoding needs a 4-byte C int"


@dataclasses.dataclass(frozen=True)
class KVGeometry:
    """The shape of one token's KV across the whole model (all layers, all KV heads)."""

    num_layers: int
    num_kv_heads: int  # total KV heads of the model (for MLA: 1)
    head_size: int  # for MLA: kv_lora_rank + rope_dim
    is_mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVGeometry.{name} must be a positive int, got {value!r}")
        if self.is_mla and self.num_kv_heads != 1:
            raise ValueError(f"KVGeometry.num_kv_heads must be 1 for MLA, got {self.num_kv_heads}")


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """Everything that changes the KV bytes. Model identity is name + revision, never a local path."""

    model: str
    revision: str
    dtype: str  # e.g. "bfloat16"
    geometry: KVGeometry
    block_size: int  # tokens per block
    cache_salt: str = ""  # optional per-tenant salt
    # How attention computes the KV of layers above the first when it is not plain attention
    # (e.g. "rerope:w=512": hidden states, and so KV, differ past the window); "" for plain.
    # Rope scaling the model config applies (YaRN, NTK) is part of it too: it changes K itself.
    attention: str = ""

    def __post_init__(self) -> None:
        for name in ("model", "revision", "dtype"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CacheIdentity.{name} must be a non-empty string, got {value!r}")
        if self.model.startswith(("/", "./", "../", "~")):
            raise ValueError(
                f"CacheIdentity.model must be a model name such as 'meta-llama/Llama-3.1-8B', "
                f"not a local path ({self.model!r}): paths differ between hosts and would never share"
            )
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise ValueError(f"CacheIdentity.block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.cache_salt, str):
            raise ValueError(f"CacheIdentity.cache_salt must be a string, got {self.cache_salt!r}")
        if not isinstance(self.attention, str):
            raise ValueError(f"CacheIdentity.attention must be a string, got {self.attention!r}")

    def canonical(self) -> bytes:
        """The canonical encoding that `digest` hashes (sorted-key ASCII JSON, versioned)."""
        fields = {
            "version": _IDENTITY_VERSION,
            "model": self.model,
            "revision": self.revision,
            "dtype": self.dtype,
            "num_layers": self.geometry.num_layers,
            "num_kv_heads": self.geometry.num_kv_heads,
            "head_size": self.geometry.head_size,
            "is_mla": self.geometry.is_mla,
            "block_size": self.block_size,
            "cache_salt": self.cache_salt,
        }
        if self.attention:  # only when set, so the digests of plain-attention stores stay what they were
            fields["attention"] = self.attention
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def digest(self) -> bytes:
        """16-byte stable digest of all fields."""
        return xxhash.xxh3_128_digest(self.canonical())

    def describe(self) -> str:
        """Human-readable one-liner for logs and `ucm store stats`."""
        geo = self.geometry
        shape = (
            f"mla layers={geo.num_layers} dim={geo.head_size}"
            if geo.is_mla
            else f"layers={geo.num_layers} kv_heads={geo.num_kv_heads} head_size={geo.head_size}"
        )
        salt = f" cache_salt={self.cache_salt!r}" if self.cache_salt else ""
        attention = f" attention={self.attention}" if self.attention else ""
        return (
            f"{self.model}@{self.revision} {self.dtype} {shape} block_size={self.block_size}{salt}{attention} "
            f"(salt {self.digest().hex()})"
        )


def _tokens_as_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Canonical little-endian int32 bytes of the token ids; out-of-range ids are an error,
    never silently wrapped (a wrapped id would alias another prompt)."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids must be one-dimensional, got shape {token_ids.shape}")
        if token_ids.dtype.kind not in "iu":
            raise ValueError(f"token_ids must be integers, got dtype {token_ids.dtype}")
        if token_ids.size and (int(token_ids.min()) < _INT32_MIN or int(token_ids.max()) > _INT32_MAX):
            raise ValueError("token_ids must fit in int32")
        return token_ids.astype("<i4", copy=False).tobytes()
    try:
        # array.array converts a list of ints ~25% faster than numpy and range-checks each one
        packed = array.array("i", token_ids)
    except OverflowError as exc:
        raise ValueError(f"token_ids must fit in int32: {exc}") from exc
    except TypeError as exc:
        raise ValueError(f"token_ids must be a sequence of ints: {exc}") from exc
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


class BlockHasher:
    """Chained block hashes for one cache identity (cheap to create; stateless between calls)."""

    def __init__(self, identity: CacheIdentity) -> None:
        self.identity = identity
        self.block_size = identity.block_size
        self._identity_digest = identity.digest()

    def hash_blocks(self, token_ids: Sequence[int], parent: bytes | None = None) -> list[bytes]:
        """Chained 16-byte hashes of the FULL blocks of token_ids (a trailing partial block is ignored);
        block i's hash covers the identity digest, the parent hash and the block's tokens.
        `parent` continues a chain (hash of the block before token_ids[0])."""
        if parent is None:
            parent = _ROOT_PARENT
        elif len(parent) != HASH_BYTES:
            raise ValueError(f"parent must be a {HASH_BYTES}-byte block hash, got {len(parent)} bytes")
        full = len(token_ids) - len(token_ids) % self.block_size
        if full == 0:
            return []
        data = _tokens_as_bytes(token_ids)
        step = self.block_size * 4
        ident = self._identity_digest
        digest = xxhash.xxh3_128_digest
        out: list[bytes] = []
        append = out.append
        for offset in range(0, full * 4, step):
            parent = digest(ident + parent + data[offset : offset + step])
            append(parent)
        return out


def block_key(block_hash: bytes, head_start: int, head_count: int) -> bytes:
    """Store key of one block's KV for KV heads [head_start, head_start+head_count):
    block_hash + 4 bytes encoding the head group. Stores never interpret keys."""
    if len(block_hash) != HASH_BYTES:
        raise ValueError(f"block_hash must be {HASH_BYTES} bytes, got {len(block_hash)}")
    if not 0 <= head_start <= 0xFFFF or not 1 <= head_count <= 0xFFFF:
        raise ValueError(
            f"head group must have 0 <= head_start <= 65535 and 1 <= head_count <= 65535, "
            f"got start={head_start} count={head_count}"
        )
    return bytes(block_hash) + _HEAD_GROUP.pack(head_start, head_count)
