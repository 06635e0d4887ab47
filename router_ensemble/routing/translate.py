"""Translate an engine's own block hashes into the router's (Dynamo's chained XXH3).

Trident engines hash blocks exactly as the router does, so their events go to the index as
they are ("native"). vLLM and SGLang hash with their own schemes (sha256, Python's hash, with
LoRA/multimodal extra keys), which the router cannot reproduce from a prompt. Like Dynamo's
KV router, we then recompute the router's hash from each stored block's token ids, chained
from the parent's, and remember engine hash -> router hash per worker so that later events
(children naming this block as parent, removals) can be translated too ("tokens").

A block whose parent the router never saw (stored before it listened, and not replayed) cannot
be placed in the chain; it is skipped, as Dynamo does. LoRA blocks are skipped: the router's
prompt hashes carry no adapter, so they could only produce false hits.
"""

from __future__ import annotations

import logging

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kv_manager.hashing import BlockHash, hash_block_tokens

logger = logging.getLogger(__name__)

HASH_SCHEMES = ("native", "tokens")


class HashTranslator:
    """Per-worker engine-hash -> router-hash map. Used only by the subscriber thread."""

    def __init__(self, worker_id: str, block_size: int) -> None:
        self.worker_id = worker_id
        self.block_size = block_size
        self._map: dict[int, list[int]] = {}  # engine hash -> [router hash, refs across tiers]
        self.skipped = 0

    def clear(self) -> None:
        self._map.clear()

    def translate(self, events: tuple[KVEvent, ...]) -> tuple[KVEvent, ...]:
        out: list[KVEvent] = []
        for event in events:
            if isinstance(event, BlockStored):
                stored = self._stored(event)
                if stored is not None:
                    out.append(stored)
            elif isinstance(event, BlockRemoved):
                removed = self._removed(event)
                if removed.block_hashes:
                    out.append(removed)
            elif isinstance(event, AllBlocksCleared):
                self._map.clear()
                out.append(event)
        return tuple(out)

    def _stored(self, event: BlockStored) -> BlockStored | None:
        bs = self.block_size
        if event.lora_id:
            return None
        if event.block_size != bs or len(event.token_ids) != len(event.block_hashes) * bs:
            self._skip(
                f"block_size {event.block_size} / {len(event.token_ids)} tokens for {len(event.block_hashes)} blocks"
            )
            return None
        parent: BlockHash | None = None
        if event.parent_block_hash is not None:
            entry = self._map.get(event.parent_block_hash)
            if entry is None:
                self._skip(f"unknown parent block {event.parent_block_hash:#x}")
                return None
            parent = BlockHash(entry[0])
        hashes: list[int] = []
        tokens = event.token_ids
        for i, engine_hash in enumerate(event.block_hashes):
            parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs])
            entry = self._map.get(engine_hash)
            if entry is None:
                self._map[engine_hash] = [parent, 1]
            else:
                entry[1] += 1
            hashes.append(parent)
        first_parent = (
            None if event.parent_block_hash is None else self._map[event.parent_block_hash][0]
        )
        return BlockStored(tuple(hashes), first_parent, event.token_ids, bs, None, event.medium)

    def _removed(self, event: BlockRemoved) -> BlockRemoved:
        hashes: list[int] = []
        for engine_hash in event.block_hashes:
            entry = self._map.get(engine_hash)
            if entry is None:
                continue
            hashes.append(entry[0])
            entry[1] -= 1
            if entry[1] <= 0:
                del self._map[engine_hash]
        return BlockRemoved(tuple(hashes), event.medium)

    def _skip(self, why: str) -> None:
        self.skipped += 1
        if self.skipped <= 3 or self.skipped % 1000 == 0:
            logger.warning(
                "kv translate worker=%s: stored event skipped (%s; %d so far)",
                self.worker_id,
                why,
                self.skipped,
            )
