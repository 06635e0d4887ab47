"""Paged KV block pool with a prefix cache and KV events.

Owned by the engine's scheduler and used only from the engine loop thread (no locking).
The pool hands out block ids; the engine's KV tensor (`kv_manager.layout`) holds the data.

- Every block is either in use (`ref_count > 0`) or on the free queue. Freed blocks that
  hold a cached (hashed) full block go to the back of the queue, so they are reused last
  (LRU) and can still be hit by a later prompt; unhashed blocks go to the front.
- `get_new_blocks` pops from the front; popping a cached block evicts it from the prefix
  cache and records a `BlockRemoved` event.
- `cache_full_blocks` registers full blocks under their chained hash (`kv_manager.hashing`)
  and records `BlockStored`; `get_cached_block` compares token ids on a hit, so a hash
  collision is a miss, never wrong KV.
- Running out of blocks is a value (`None`), not an exception: the scheduler preempts.
- `on_evict`, when set, is called with a cached block just before its content is dropped
  (offload on eviction to a lower KV tier, `kv_manager.tiers.cache`); it runs on the loop
  thread inside `get_new_blocks`, so it must copy and return.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # the block's tokens, kept to verify hits
    parent_hash: int | None = None  # the preceding block's hash, for a tier's copy of this one
    prev_free: Block | None = None
    next_free: Block | None = None


class FreeBlockQueue:
    """Doubly linked list threaded through the blocks: O(1) pop, append and remove."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self._head = Block(-1)
        self._tail = Block(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> Block:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def appendleft(self, block: Block) -> None:
        self._link(block, self._head, self._head.next_free)

    def append(self, block: Block) -> None:
        self._link(block, self._tail.prev_free, self._tail)

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not free")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def block_ids(self) -> list[int]:
        out, node = [], self._head.next_free
        while node is not None and node is not self._tail:
            out.append(node.block_id)
            node = node.next_free
        return out

    def _link(self, block: Block, prev: Block | None, nxt: Block | None) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already free")
        assert prev is not None and nxt is not None
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self.num_free += 1


class BlockPool:
    """Block allocator + prefix cache for one engine. See the module docstring."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[int, Block] = {}
        self._events: list[KVEvent] = []
        self.on_evict: Callable[[Block], None] | None = None

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.free_queue.num_free

    def get_cached_block(self, block_hash: int, token_ids: Sequence[int]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    # -- allocation ----------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[Block] | None:
        """Take `n` blocks (ref_count 1), evicting cached ones as needed; None if short."""
        if n > self.free_queue.num_free:
            return None
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found in the prefix cache (they may be free)."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def free_blocks(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each. Pass a request's blocks in order: the tail of the
        request is freed last and so evicted first among them (vLLM's order)."""
        for block in reversed(list(blocks)):
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block.block_id} freed twice")
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    # -- prefix cache --------------------------------------------------------------------
    def cache_full_blocks(
        self,
        blocks: Sequence[Block],
        block_hashes: Sequence[int],
        token_ids: Sequence[int],
        parent_hash: int | None,
    ) -> None:
        """Register full blocks (`token_ids` spans them all) and record one BlockStored."""
        if not self.enable_caching or not blocks:
            return
        bs = self.block_size
        stored_hashes: list[int] = []
        stored_tokens: list[int] = []
        stored_parent = parent_hash
        for i, (block, block_hash) in enumerate(zip(blocks, block_hashes, strict=True)):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            if block.block_hash is not None:
                parent_hash = block.block_hash
                continue
            existing = self.cached.get(block_hash)
            if existing is not None and existing is not block:
                # Another block already holds this content; keep the first copy cached.
                parent_hash = block_hash
                continue
            block.block_hash = block_hash
            block.token_ids = tokens
            block.parent_hash = parent_hash
            self.cached[block_hash] = block
            if not stored_hashes:
                stored_parent = parent_hash
            stored_hashes.append(block_hash)
            stored_tokens.extend(tokens)
            parent_hash = block_hash
        if stored_hashes:
            self._events.append(
                BlockStored(tuple(stored_hashes), stored_parent, tuple(stored_tokens), bs)
            )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no block is in use."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = block.parent_hash = None
            block.token_ids = None
        self.cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            if self.on_evict is not None:
                self.on_evict(block)
            del self.cached[block.block_hash]
            self._events.append(BlockRemoved((block.block_hash,)))
        block.block_hash = block.parent_hash = None
        block.token_ids = None
