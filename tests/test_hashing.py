"""Block identity: determinism, chaining, sensitivity to every identity field, and key layout."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from ucm.hashing import BlockHasher, CacheIdentity, KVGeometry, block_key

GEO = KVGeometry(num_layers=32, num_kv_heads=8, head_size=128)
IDENT = CacheIdentity(
    model="meta-llama/Llama-3.1-8B", revision="main", dtype="bfloat16", geometry=GEO, block_size=16
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = list(range(1000, 1000 + 16 * 5 + 7))  # five full blocks and a partial one

_CHILD = """
import sys
from ucm.hashing import BlockHasher, CacheIdentity, KVGeometry
ident = CacheIdentity(model="meta-llama/Llama-3.1-8B", revision="main", dtype="bfloat16",
                      geometry=KVGeometry(32, 8, 128), block_size=16)
print(",".join(h.hex() for h in BlockHasher(ident).hash_blocks(list(range(1000, 1087)))))
print(ident.digest().hex())
"""


def test_partial_block_ignored_and_chain_continues() -> None:
    hasher = BlockHasher(IDENT)
    hashes = hasher.hash_blocks(TOKENS)
    assert len(hashes) == 5 and all(len(h) == 16 for h in hashes)
    assert len(set(hashes)) == 5
    # continuing from block 2's hash gives the same tail as hashing the whole prefix
    assert hasher.hash_blocks(TOKENS[48:80], parent=hashes[2]) == hashes[3:5]
    assert hasher.hash_blocks(TOKENS[:15]) == []
    # numpy input of any integer dtype encodes like a list
    assert hasher.hash_blocks(np.array(TOKENS, dtype=np.int64)) == hashes
    assert hasher.hash_blocks(np.array(TOKENS, dtype=np.uint32)) == hashes


def test_chain_depends_on_prefix() -> None:
    hasher = BlockHasher(IDENT)
    a = hasher.hash_blocks(TOKENS)
    changed = list(TOKENS)
    changed[3] += 1
    b = hasher.hash_blocks(changed)
    assert all(x != y for x, y in zip(a, b, strict=True))  # a change in block 0 changes every later block


@pytest.mark.parametrize(
    "change",
    [
        {"model": "meta-llama/Llama-3.1-70B"},
        {"revision": "abc123"},
        {"dtype": "float16"},
        {"geometry": KVGeometry(num_layers=31, num_kv_heads=8, head_size=128)},
        {"geometry": KVGeometry(num_layers=32, num_kv_heads=4, head_size=128)},
        {"geometry": KVGeometry(num_layers=32, num_kv_heads=8, head_size=64)},
        {"cache_salt": "tenant-a"},
    ],
)
def test_every_identity_field_changes_hashes(change: dict[str, object]) -> None:
    other = dataclasses.replace(IDENT, **change)  # type: ignore[arg-type]
    assert other.digest() != IDENT.digest()
    assert BlockHasher(other).hash_blocks(TOKENS)[0] != BlockHasher(IDENT).hash_blocks(TOKENS)[0]


def test_block_size_changes_hashes() -> None:
    other = dataclasses.replace(IDENT, block_size=32)
    assert BlockHasher(other).hash_blocks(TOKENS)[0] not in BlockHasher(IDENT).hash_blocks(TOKENS)


def test_cross_process_determinism_and_pinned_value() -> None:
    """Different PYTHONHASHSEEDs in fresh interpreters give identical hashes, equal to ours."""
    expected = ",".join(h.hex() for h in BlockHasher(IDENT).hash_blocks(TOKENS))
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = dict(
            os.environ,
            PYTHONHASHSEED=seed,
            PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        )
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(out.stdout)
    assert len(outputs) == 1
    hashes_line, digest_line = outputs.pop().splitlines()
    assert hashes_line == expected
    assert digest_line == IDENT.digest().hex()
    # Pinned known answer: a change here breaks every stored block in the field; bump the
    # identity version deliberately instead of changing the encoding by accident.
    assert IDENT.digest().hex() == PINNED_DIGEST


PINNED_DIGEST = "bed2dd5420d3c6e1eede6519c5187c8c"


def test_bad_input_is_rejected_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="model"):
        dataclasses.replace(IDENT, model="/models/llama")
    with pytest.raises(ValueError, match="block_size"):
        dataclasses.replace(IDENT, block_size=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        KVGeometry(num_layers=61, num_kv_heads=2, head_size=576, is_mla=True)
    with pytest.raises(ValueError, match="head_size"):
        KVGeometry(num_layers=1, num_kv_heads=1, head_size=0)
    hasher = BlockHasher(IDENT)
    with pytest.raises(ValueError, match="int32"):
        hasher.hash_blocks([2**40] * 16)
    with pytest.raises(ValueError, match="int32"):
        hasher.hash_blocks(np.full(16, 2**40, dtype=np.int64))
    with pytest.raises(ValueError, match="parent"):
        hasher.hash_blocks(TOKENS, parent=b"short")


def test_describe_names_model_and_salt() -> None:
    text = IDENT.describe()
    assert "meta-llama/Llama-3.1-8B@main" in text and IDENT.digest().hex() in text


def test_block_key_encodes_head_group() -> None:
    h = BlockHasher(IDENT).hash_blocks(TOKENS)[0]
    k0 = block_key(h, 0, 4)
    k1 = block_key(h, 4, 4)
    assert len(k0) == 20 and k0[:16] == h and k0 != k1
    assert block_key(h, 0, 8) not in (k0, k1)
    with pytest.raises(ValueError, match="head"):
        block_key(h, 0, 0)
    with pytest.raises(ValueError, match="block_hash"):
        block_key(h[:8], 0, 1)
