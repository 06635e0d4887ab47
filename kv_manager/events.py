"""KV cache events: what a worker's prefix cache gained or lost.

The block pool appends these as blocks are cached and evicted; the engine drains them with
`take_events()`; the worker publishes them over ZMQ (`kv_manager.publisher`) in the wire
format vLLM, SGLang and Dynamo share; the router's index (`router_ensemble`) consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks entered the prefix cache. `block_hashes[i]` covers
    `token_ids[i*block_size:(i+1)*block_size]`; `parent_block_hash` precedes the first."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the prefix cache (evicted for reuse)."""

    block_hashes: tuple[int, ...]
    medium: str | None = "GPU"


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (reset or restart)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EngineEvents:
    """An engine's own KV event stream (vLLM's ZMQ publisher), named in load reports so the
    router listens there: PUB `endpoint`, replay `replay_endpoint`, block `hashes` scheme."""

    endpoint: str
    replay_endpoint: str = ""
    hashes: str = "tokens"
