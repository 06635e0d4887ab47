"""TensorRT-LLM KV cache events -> Trident's (`kv_manager.events`), with Trident's block hashes.

`TrtllmEngine`'s loop thread drains `LLM.get_kv_cache_events_async` and feeds each event
dict to one `KvEventTranslator`; `take_events()` hands the translated events to the worker,
which publishes them like the torch engine's. Pure: no tensorrt_llm import.

The dicts follow TensorRT-LLM's `KVCacheEventSerializer` (`tensorrt_llm/_utils.py`,
TensorRT-LLM 1.1.0): `{"event_id", "window_size", ["attention_dp_rank"], "data": D}` where D is
- `{"type": "created", "num_blocks_per_cache_level": [...]}` (at start, one per window size),
- `{"type": "stored", "parent_hash": h | None, "blocks": [{"type": "stored_block",
  "block_hash": h, "tokens": [{"type": "unique_token", "token_id", "token_extra_id"}],
  "cache_level": 0 | 1, "priority": p}]}`,
- `{"type": "removed", "block_hashes": [h, ...]}`,
- `{"type": "updated", "block_hash": h, "cache_level": {"type": "event_diff", "new_value",
  "old_value"}, "priority": {...}}` (a block moved between the GPU and host levels).

How they become Trident's:
- TensorRT-LLM hashes blocks its own way; the router looks blocks up by Dynamo's chained
  XXH3 (`kv_manager.hashing`). The translator recomputes that hash from each stored block's
  tokens, chained on its parent's, and keeps TensorRT-LLM hash -> (Trident hash, tokens,
  parent, level) for every block it announced, so removals and level changes name the same
  blocks. A block whose parent it never announced, a partial block, or one with extra token
  ids (multimodal, LoRA) cannot be hashed the router's way: it and the rest of its event
  are skipped, and a later removal of it is dropped.
- `cache_level` is the medium: 0 the GPU pool ("GPU"), 1 the host-memory blocks ("CPU").
  An update from level 0 to 1 is a store on "CPU" then a removal from "GPU" (and back).
- Models with several attention windows report per window; as Dynamo does, only the events
  of the largest window (the global-attention layers), learnt from the "created" events,
  are kept. Events without `window_size` are all kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kv_manager.events import BlockRemoved, BlockStored, KVEvent
from kv_manager.hashing import hash_block_tokens

logger = logging.getLogger(__name__)

MEDIA = {0: "GPU", 1: "CPU"}  # TensorRT-LLM cache_level -> Trident medium


@dataclass(slots=True)
class _Block:
    ours: int
    parent: int | None  # our hash of the parent block
    tokens: tuple[int, ...]
    level: int


class KvEventTranslator:
    """One per engine; fed on the engine's loop thread only."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[int, _Block] = {}  # TensorRT-LLM block hash -> what we announced
        self._max_window: int | None = None
        self._created_phase = True
        self._last_event_id: int | None = None
        self.num_blocks = 0  # GPU blocks of the largest window, from its "created" event

    @property
    def tracked_blocks(self) -> int:
        return len(self._blocks)

    def translate(self, events: Iterable[Mapping[str, Any]]) -> list[KVEvent]:
        out: list[KVEvent] = []
        for event in events:
            try:
                out += self._one(event)
            except (KeyError, TypeError, ValueError) as exc:  # one malformed event, not the stream
                logger.warning("TensorRT-LLM KV event %r skipped: %r", event, exc)
        return out

    def _one(self, event: Mapping[str, Any]) -> list[KVEvent]:
        data = event["data"]
        kind = data["type"]
        if kind == "created":
            if self._created_phase:
                self._created(event)
            return []
        self._created_phase = False
        if (
            "window_size" in event
            and self._max_window is not None
            and int(event["window_size"]) != self._max_window
        ):
            return []
        self._check_sequence(event.get("event_id"))
        if kind == "stored":
            return self._stored(data)
        if kind == "removed":
            return self._removed(data["block_hashes"])
        if kind == "updated":
            return self._updated(data)
        logger.debug("TensorRT-LLM KV event of type %r ignored", kind)
        return []

    def _created(self, event: Mapping[str, Any]) -> None:
        levels = list(event["data"].get("num_blocks_per_cache_level") or ())
        window = int(event["window_size"]) if "window_size" in event else None
        if window is not None and self._max_window is not None and window < self._max_window:
            return
        if window is not None:
            self._max_window = window
        if levels:
            self.num_blocks = int(levels[0])

    def _check_sequence(self, event_id: Any) -> None:
        if event_id is None:
            return
        if self._last_event_id is not None and int(event_id) != self._last_event_id + 1:
            logger.info(
                "TensorRT-LLM KV events: id %s after %s (events in between were dropped)",
                event_id,
                self._last_event_id,
            )
        self._last_event_id = int(event_id)

    def _stored(self, data: Mapping[str, Any]) -> list[KVEvent]:
        parent_trt = data.get("parent_hash")
        parent: int | None = None
        if parent_trt is not None:
            known = self._blocks.get(int(parent_trt))
            if known is None:
                logger.debug(
                    "TensorRT-LLM stored blocks under unknown parent %s skipped", parent_trt
                )
                return []
            parent = known.ours
        out: list[KVEvent] = []
        run: list[tuple[int, _Block]] = []  # consecutive blocks of one level, one BlockStored
        for block in data["blocks"]:
            tokens = block["tokens"]
            if len(tokens) != self.block_size or any(
                int(t.get("token_extra_id") or 0) for t in tokens
            ):
                break  # partial or extra-keyed: neither it nor its descendants have our hashes
            ids = tuple(int(t["token_id"]) for t in tokens)
            level = int(block.get("cache_level") or 0)
            entry = _Block(hash_block_tokens(parent, ids), parent, ids, level)
            if run and run[-1][1].level != level:
                out.append(self._stored_event(run))
                run = []
            run.append((int(block["block_hash"]), entry))
            parent = entry.ours
        if run:
            out.append(self._stored_event(run))
        return out

    def _stored_event(self, run: list[tuple[int, _Block]]) -> BlockStored:
        for trt_hash, entry in run:
            self._blocks[trt_hash] = entry
        first = run[0][1]
        return BlockStored(
            block_hashes=tuple(e.ours for _, e in run),
            parent_block_hash=first.parent,
            token_ids=tuple(t for _, e in run for t in e.tokens),
            block_size=self.block_size,
            medium=MEDIA.get(first.level, "GPU"),
        )

    def _removed(self, trt_hashes: Iterable[Any]) -> list[KVEvent]:
        by_medium: dict[str, list[int]] = {}
        for h in trt_hashes:
            entry = self._blocks.pop(int(h), None)
            if entry is not None:
                by_medium.setdefault(MEDIA.get(entry.level, "GPU"), []).append(entry.ours)
        return [BlockRemoved(tuple(hashes), medium=medium) for medium, hashes in by_medium.items()]

    def _updated(self, data: Mapping[str, Any]) -> list[KVEvent]:
        diff = data.get("cache_level")
        entry = self._blocks.get(int(data["block_hash"]))
        if entry is None or not isinstance(diff, Mapping) or diff.get("new_value") is None:
            return []  # a priority change, or a block the router never heard of
        new = int(diff["new_value"])
        if new == entry.level:
            return []
        old_medium = MEDIA.get(entry.level, "GPU")
        entry.level = new
        stored = BlockStored(
            (entry.ours,), entry.parent, entry.tokens, self.block_size, medium=MEDIA.get(new, "GPU")
        )
        return [stored, BlockRemoved((entry.ours,), medium=old_medium)]
