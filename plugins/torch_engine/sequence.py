"""Per-request state inside the torch engine (engine loop thread only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kv_manager.block_pool import Block
from kv_manager.hashing import BlockHash, hash_block_tokens
from plugins.base import ChunkSink
from plugins.torch_engine.sampler import SamplingState
from trident.core.types import GenerateRequest


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks allocated, an external KV load in flight
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """A request being served. `token_ids` is prompt + generated tokens; the KV of the first
    `num_computed` of them is in `block_table`. The scheduler's `KVCacheManager` owns
    `block_table` (the runner only reads it)."""

    request: GenerateRequest
    sink: ChunkSink
    sampling: SamplingState
    token_ids: list[int]
    prompt_len: int
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[Block] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    num_computed: int = 0
    cached_tokens: int = 0  # prompt tokens served from a cache at first admission
    num_outputs: int = 0
    num_emitted: int = 0  # outputs already handed to the sink
    admitted_once: bool = False
    import_pending: bool = False  # the prompt's KV is to be loaded from a prefill worker
    load_target: int = 0  # tokens computed once the KV load in flight has finished
    skip_tiers: bool = False  # an onboarding from a KV tier failed: compute instead
    # logprobs (SamplingParams.logprobs / prompt_logprobs), not yet emitted ones included
    logprobs: list[float] = field(default_factory=list)  # one per output appended in this run
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    num_logprobs_emitted: int = 0
    prompt_logprobs: list[float] = field(default_factory=list)  # prompt tokens 1.. so far
    prompt_top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether every prompt position's logits are needed (prompt logprobs): such a
        prompt is computed in full, never read from a prefix cache, as in vLLM."""
        request = self.request
        return request.sampling.prompt_logprobs is not None and request.kv_descriptor is None

    @property
    def output_start(self) -> int:
        """Where the request's outputs begin in `token_ids` (a migrated request's earlier
        outputs are the end of its prompt)."""
        return self.prompt_len - self.request.output_offset

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    def hashes_upto(self, num_blocks: int, block_size: int) -> list[BlockHash]:
        """Chained hashes of the first `num_blocks` full blocks, computed incrementally."""
        while len(self.block_hashes) < num_blocks:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            tokens = self.token_ids[i * block_size : (i + 1) * block_size]
            self.block_hashes.append(hash_block_tokens(parent, tokens))
        return self.block_hashes[:num_blocks]
