"""TensorRT-LLM KV cache events -> Trident's, with the router's block hashes.

The payloads are written from TensorRT-LLM's documented event dicts: `KVCacheEventSerializer`
in `tensorrt_llm/_utils.py` (TensorRT-LLM 1.1.0), what `LLM.get_kv_cache_events()` returns.
TensorRT-LLM's own block hashes are arbitrary integers here: the translator never uses them
as Trident hashes, only as names.
"""

from __future__ import annotations

from kv_manager.events import BlockRemoved, BlockStored
from kv_manager.hashing import hash_blocks
from plugins.trtllm.events import KvEventTranslator

BS = 4


def _tokens(ids, extra=0):
    return [{"type": "unique_token", "token_id": t, "token_extra_id": extra} for t in ids]


def _block(trt_hash, ids, level=0, extra=0):
    return {
        "type": "stored_block",
        "block_hash": trt_hash,
        "tokens": _tokens(ids, extra),
        "cache_level": level,
        "priority": 35,
    }


def _event(event_id, data, window=4096, **extra):
    return {"event_id": event_id, "data": data, "window_size": window, **extra}


def _stored(event_id, parent, blocks, window=4096):
    return _event(event_id, {"type": "stored", "parent_hash": parent, "blocks": blocks}, window)


def _created(event_id, blocks=(1000, 0), window=4096):
    return _event(event_id, {"type": "created", "num_blocks_per_cache_level": list(blocks)}, window)


PROMPT = list(range(100, 112))  # three full blocks


def test_stored_blocks_get_the_routers_chained_hashes() -> None:
    tr = KvEventTranslator(BS)
    out = tr.translate(
        [_created(0), _stored(1, None, [_block(11, PROMPT[0:4]), _block(12, PROMPT[4:8])])]
    )
    assert out == [
        BlockStored(tuple(hash_blocks(PROMPT[:8], BS)), None, tuple(PROMPT[:8]), BS, medium="GPU")
    ]
    assert tr.num_blocks == 1000
    # a later event chains on TensorRT-LLM's parent hash: ours continues the same chain
    (child,) = tr.translate([_stored(2, 12, [_block(13, PROMPT[8:12])])])
    full = hash_blocks(PROMPT, BS)
    assert child.block_hashes == (full[2],) and child.parent_block_hash == full[1]


def test_removed_names_the_blocks_it_announced() -> None:
    tr = KvEventTranslator(BS)
    tr.translate([_stored(0, None, [_block(11, PROMPT[0:4]), _block(12, PROMPT[4:8])])])
    out = tr.translate([_event(1, {"type": "removed", "block_hashes": [12, 999]})])
    assert out == [BlockRemoved((hash_blocks(PROMPT[:8], BS)[1],), medium="GPU")]
    assert tr.tracked_blocks == 1
    assert (
        tr.translate([_event(2, {"type": "removed", "block_hashes": [12]})]) == []
    )  # already gone


def test_partial_and_extra_keyed_blocks_stop_the_chain() -> None:
    tr = KvEventTranslator(BS)
    out = tr.translate([_stored(0, None, [_block(11, PROMPT[0:4]), _block(12, PROMPT[4:7])])])
    assert [e.block_hashes for e in out] == [(hash_blocks(PROMPT, BS)[0],)]
    # a child of the partial block has no Trident hash either
    assert tr.translate([_stored(1, 12, [_block(13, PROMPT[8:12])])]) == []
    # multimodal/LoRA extra ids: not hashable the router's way
    assert tr.translate([_stored(2, None, [_block(21, [1, 2, 3, 4], extra=7)])]) == []
    # removing them says nothing
    assert tr.translate([_event(3, {"type": "removed", "block_hashes": [12, 13, 21]})]) == []


def test_cache_level_is_the_medium_and_updates_move_blocks() -> None:
    tr = KvEventTranslator(BS)
    out = tr.translate(
        [_stored(0, None, [_block(11, PROMPT[0:4]), _block(12, PROMPT[4:8], level=1)])]
    )
    h = hash_blocks(PROMPT[:8], BS)
    assert [(e.block_hashes, e.medium) for e in out] == [((h[0],), "GPU"), ((h[1],), "CPU")]
    assert out[1].parent_block_hash == h[0] and out[1].token_ids == tuple(PROMPT[4:8])
    # offloaded to host memory: stored on CPU, then removed from the GPU
    diff = {"type": "event_diff", "new_value": 1, "old_value": 0}
    moved = tr.translate(
        [_event(1, {"type": "updated", "block_hash": 11, "cache_level": diff, "priority": None})]
    )
    assert moved == [
        BlockStored((h[0],), None, tuple(PROMPT[:4]), BS, medium="CPU"),
        BlockRemoved((h[0],), medium="GPU"),
    ]
    # a priority-only update, or one to the same level, changes nothing
    same = {"type": "event_diff", "new_value": 1, "old_value": 1}
    assert (
        tr.translate(
            [
                _event(
                    2, {"type": "updated", "block_hash": 11, "cache_level": same, "priority": None}
                )
            ]
        )
        == []
    )
    assert tr.translate([_event(3, {"type": "removed", "block_hashes": [11]})]) == [
        BlockRemoved((h[0],), "CPU")
    ]


def test_only_the_largest_windows_events_are_kept() -> None:
    tr = KvEventTranslator(BS)
    tr.translate([_created(0, (500, 0), window=512), _created(1, (1000, 0), window=4096)])
    assert tr.num_blocks == 1000
    assert tr.translate([_stored(2, None, [_block(11, PROMPT[0:4])], window=512)]) == []
    assert len(tr.translate([_stored(3, None, [_block(11, PROMPT[0:4])], window=4096)])) == 1


def test_events_without_window_size_and_malformed_ones() -> None:
    tr = KvEventTranslator(BS)
    ok = {
        "event_id": 0,
        "data": {"type": "stored", "parent_hash": None, "blocks": [_block(11, PROMPT[0:4])]},
    }
    bad = {"event_id": 1, "data": {"type": "stored"}}  # no blocks: skipped with a warning
    out = tr.translate([bad, ok, {"event_id": 2, "data": {"type": "something_new"}}])
    assert len(out) == 1 and out[0].block_hashes == (hash_blocks(PROMPT, BS)[0],)
    # attention_dp_rank is accepted (and ignored: one rank per worker)
    dp = _stored(3, 11, [_block(12, PROMPT[4:8])])
    dp["attention_dp_rank"] = 0
    assert len(tr.translate([dp])) == 1
