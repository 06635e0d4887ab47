"""HashTranslator: an engine's own block hashes mapped onto the router's by token ids."""

from __future__ import annotations

from kv_manager.events import AllBlocksCleared, BlockRemoved, BlockStored
from kv_manager.hashing import hash_blocks
from router_ensemble.routing.index import KvIndex
from router_ensemble.routing.translate import HashTranslator

BS = 4
TOKENS = list(range(100, 124))  # 6 blocks
OURS = hash_blocks(TOKENS, BS)
THEIRS = [0xA0 + i for i in range(6)]  # whatever the engine uses


def test_stored_chains_across_events_and_removal_follows() -> None:
    tr = HashTranslator("w", BS)
    index = KvIndex()
    first = tr.translate((BlockStored(tuple(THEIRS[:2]), None, tuple(TOKENS[:8]), BS),))
    second = tr.translate((BlockStored(tuple(THEIRS[2:]), THEIRS[1], tuple(TOKENS[8:]), BS),))
    assert first[0].block_hashes == tuple(OURS[:2])
    assert second[0].block_hashes == tuple(OURS[2:]) and second[0].parent_block_hash == OURS[1]
    index.apply_events("w", first + second)
    assert index.find_matches(OURS) == {"w": 6}
    index.apply_events("w", tr.translate((BlockRemoved((THEIRS[3], 0xDEAD)),)))
    assert index.find_matches(OURS) == {"w": 3}


def test_tiers_keep_the_mapping_until_the_last_copy_goes() -> None:
    tr = HashTranslator("w", BS)
    tr.translate((BlockStored((THEIRS[0],), None, tuple(TOKENS[:4]), BS, None, "GPU"),))
    tr.translate((BlockStored((THEIRS[0],), None, tuple(TOKENS[:4]), BS, None, "CPU"),))
    assert tr.translate((BlockRemoved((THEIRS[0],), "GPU"),)) == (BlockRemoved((OURS[0],), "GPU"),)
    assert tr.translate((BlockRemoved((THEIRS[0],), "CPU"),)) == (BlockRemoved((OURS[0],), "CPU"),)
    assert tr.translate((BlockRemoved((THEIRS[0],), "CPU"),)) == ()


def test_unplaceable_blocks_are_skipped() -> None:
    tr = HashTranslator("w", BS)
    orphan = BlockStored((THEIRS[3],), THEIRS[2], tuple(TOKENS[12:16]), BS)  # parent never seen
    lora = BlockStored((THEIRS[0],), None, tuple(TOKENS[:4]), BS, lora_id=3)
    wrong_size = BlockStored((THEIRS[0],), None, tuple(TOKENS[:8]), 8)
    assert tr.translate((orphan, lora, wrong_size)) == ()
    assert tr.skipped == 2  # LoRA blocks are skipped silently


def test_clear_forgets_the_mapping() -> None:
    tr = HashTranslator("w", BS)
    tr.translate((BlockStored((THEIRS[0],), None, tuple(TOKENS[:4]), BS),))
    assert tr.translate((AllBlocksCleared(),)) == (AllBlocksCleared(),)
    assert tr.translate((BlockRemoved((THEIRS[0],)),)) == ()
