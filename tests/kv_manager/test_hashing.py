from __future__ import annotations

import random
import struct

import pytest
import xxhash

from kv_manager import hashing
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


# ---------------------------------------------------------------- the two paths agree


def _native_module():
    """The C extension is optional (setup.py builds it where a compiler exists)."""
    return pytest.importorskip("kv_manager._hashing", reason="C extension not built")


@pytest.mark.parametrize("seed", [0, 1, SEED, 2**63 + 12345, 2**64 - 1])
def test_native_xxh3_equals_xxhash_at_every_length(seed):
    # every code path of XXH3-64: 0-3, 4-8, 9-16, 17-128, 129-240 bytes, then the long
    # path's stripes, 1 KiB blocks, partial blocks and last stripe
    ext = _native_module()
    rng = random.Random(seed)
    for n in range(0, 2600):
        data = rng.randbytes(n)
        assert ext.xxh3_64(data, seed) == xxhash.xxh3_64_intdigest(data, seed=seed), n


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 15, 16, 17, 32, 33, 60, 61, 64, 100, 256])
def test_native_and_python_paths_give_the_same_hashes(block_size):
    ext = _native_module()
    rng = random.Random(block_size)
    tokens = [rng.randrange(2**32) for _ in range(block_size * 9 + block_size // 2)]
    end = block_size * 9
    for parent, start in ((None, 0), (None, block_size * 2), (2**64 - 1, block_size), (7, 0)):
        expected = hashing._chained_py(tokens, block_size, parent, start, end)
        assert ext.chained_hashes(tokens, block_size, parent, start, end) == expected
        assert hash_blocks(tokens, block_size, parent=parent, start=start) == expected
    assert hashing.NATIVE


def test_bad_token_ids_raise_type_or_overflow_error():
    for path in (hash_blocks, lambda t, bs: hashing._chained_py(t, bs, None, 0, len(t))):
        with pytest.raises(OverflowError):
            path([1, -1], 2)
        with pytest.raises(OverflowError):
            path([1, 2**32], 2)
        with pytest.raises(TypeError):
            path([1, 2.0], 2)
        with pytest.raises(TypeError):
            path([1, "2"], 2)


def test_int_like_token_ids_take_the_python_path():
    class Token:  # e.g. a numpy integer: not an int, but has __index__
        def __init__(self, value):
            self.value = value

        def __index__(self):
            return self.value

    tokens = list(range(100, 132))
    assert hash_blocks([Token(t) for t in tokens], 16) == hash_blocks(tokens, 16)
    assert hash_blocks(tuple(tokens), 16) == hash_blocks(tokens, 16)
    assert hash_block_tokens(None, [Token(t) for t in tokens[:16]]) == hash_blocks(tokens, 16)[0]
