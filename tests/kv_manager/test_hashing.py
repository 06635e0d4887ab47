from __future__ import annotations

import struct

import pytest
import xxhash

from kv_manager.hashing import SEED, hash_block_tokens, hash_blocks, local_block_hash


def test_local_hash_is_xxh3_seed_1337_over_u32_le():
    tokens = [1, 2, 70000]
    expected = xxhash.xxh3_64_intdigest(struct.pack("<3I", *tokens), seed=1337)
    assert SEED == 1337
    assert local_block_hash(tokens) == expected


def test_chain_hashes_parent_and_local_as_u64_pair():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    h0 = local_block_hash(a)
    h1 = xxhash.xxh3_64_intdigest(struct.pack("<QQ", h0, local_block_hash(b)), seed=1337)
    assert hash_blocks(a + b, 4) == [h0, h1]
    assert hash_block_tokens(h0, b) == h1


def test_partial_blocks_are_not_hashed_and_prefixes_share_hashes():
    x = hash_blocks(list(range(10)), 4)
    y = hash_blocks(list(range(8)) + [99, 98, 97, 96], 4)
    assert len(x) == 2 and x == y[:2] and len(y) == 3
    # Same block content under a different parent hashes differently.
    assert hash_blocks([0, 1, 2, 3, 4, 5, 6, 7], 4)[1] != hash_blocks([4, 5, 6, 7], 4)[0]


def test_resume_from_parent_and_bad_args():
    tokens = list(range(12))
    full = hash_blocks(tokens, 4)
    assert hash_blocks(tokens, 4, parent=full[0], start=4) == full[1:]
    with pytest.raises(ValueError):
        hash_blocks(tokens, 0)
    with pytest.raises(ValueError):
        hash_blocks(tokens, 4, start=3)
