"""Block hashing: Dynamo's chained XXH3-64 scheme, the one implementation for the project.

A block's local hash is XXH3-64 (seed 1337) over its token ids as little-endian u32. The
chained (sequence) hash of block 0 is its local hash; of block i it is XXH3-64 (seed 1337)
over the little-endian u64 pair `(h[i-1], local[i])`. Partial blocks are not hashed. Engines
(prefix cache), the router (index lookups) and tests all call `hash_blocks`.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import NewType

import xxhash

BlockHash = NewType("BlockHash", int)
SEED = 1337
_PAIR = struct.Struct("<QQ")


def local_block_hash(tokens: Sequence[int]) -> int:
    """XXH3-64 of one block's token ids (u32 little-endian)."""
    buf = array("I", tokens)
    if buf.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte "I"
        raise RuntimeError("array('I') is not 32-bit on this platform")
    return xxhash.xxh3_64_intdigest(buf.tobytes(), seed=SEED)


def chain_hash(parent: BlockHash | None, local: int) -> BlockHash:
    if parent is None:
        return BlockHash(local)
    return BlockHash(xxhash.xxh3_64_intdigest(_PAIR.pack(parent, local), seed=SEED))


def hash_block_tokens(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """Chained hash of one full block given its parent's chained hash."""
    return chain_hash(parent, local_block_hash(tokens))


def hash_blocks(
    token_ids: Sequence[int], block_size: int, parent: BlockHash | None = None, start: int = 0
) -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids[start:]` (start is block-aligned)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if start % block_size:
        raise ValueError(f"start ({start}) must be a multiple of block_size ({block_size})")
    end = len(token_ids) - len(token_ids) % block_size
    if end <= start:
        return []
    # Convert once and hash slices of one buffer: the router hashes 4K-token prompts per
    # decision, and per-block conversions dominate otherwise.
    data = memoryview(array("I", token_ids[start:end]).tobytes())
    step = block_size * 4
    digest = xxhash.xxh3_64_intdigest
    out: list[BlockHash] = []
    for off in range(0, len(data), step):
        local = digest(data[off : off + step], seed=SEED)
        parent = BlockHash(local) if parent is None else BlockHash(digest(_PAIR.pack(parent, local), seed=SEED))
        out.append(parent)
    return out
