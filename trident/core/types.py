"""Request and response types shared by engines, workers, router and frontend.

These are plain frozen dataclasses: the router builds a `GenerateRequest` from Triton
inputs, the decode/prefill workers hand it to an engine, and engines stream
`TokenChunk`s back. Nothing here imports torch or Triton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trident.core.errors import ValidationError

FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_tokens or the model's context length
FINISH_ABORT = "abort"  # cancelled by the client or the router
FINISH_ERROR = "error"  # the engine failed on this request


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature == 0` means greedy. `top_k <= 0` disables top-k. `seed` makes a
    request's sampling reproducible regardless of what else is in the batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise `ValidationError` naming the first invalid field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValidationError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise ValidationError("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValidationError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValidationError("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValidationError("seed", f"must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValidationError("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValidationError(
                "min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise ValidationError("stop_token_ids", "must be non-negative integers")


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation request as an engine sees it: token ids in, token ids out.

    `kv_descriptor` is set on a decode worker when the prompt's KV was computed by a prefill
    worker (an opaque descriptor understood by `kv_manager.transfer`); `first_token`
    is then the token the prefill worker already sampled. `hold_kv` asks the engine to
    keep the prompt's blocks pinned after it finishes, for export by a prefill worker.
    """

    request_id: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    hold_kv: bool = False
    kv_descriptor: bytes | None = None
    first_token: int | None = None

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        """Check the prompt against the model; raise `ValidationError` naming the field."""
        from trident.core.errors import ContextLengthError

        self.sampling.validate()
        if not self.input_ids:
            raise ValidationError("prompt", "must not be empty")
        bad = [t for t in self.input_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValidationError("input_ids", f"token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        total = len(self.input_ids) + self.sampling.max_tokens
        if total > max_model_len:
            raise ContextLengthError(
                "max_tokens" if len(self.input_ids) < max_model_len else "prompt",
                f"prompt ({len(self.input_ids)} tokens) + max_tokens "
                f"({self.sampling.max_tokens}) = {total} exceeds the model's context length "
                f"({max_model_len})",
            )


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Tokens produced for one request since its previous chunk.

    The last chunk of a request has `finished=True` and a `finish_reason`. `error` is
    set only with `finish_reason == "error"`. `kv_descriptor` is set on the last chunk of a
    `hold_kv` request: the descriptor of the pinned prompt blocks.
    """

    request_id: str
    output_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    num_input_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    kv_descriptor: bytes | None = None


@dataclass(frozen=True, slots=True)
class TierStats:
    """Counters of one KV tier below the device pool (`kv_manager.tiers`), since start."""

    medium: str  # "CPU" (host memory) or "DISK"
    held_blocks: int
    offloaded: int  # blocks written into the tier
    onboarded: int  # blocks read back into the device pool
    queried: int  # prompt blocks the device pool missed (the hit rate's denominator)
    hits: int  # of those, onboarded from this tier
    bytes_offloaded: int
    bytes_onboarded: int
    onboard_seconds: float
    failed: int  # stores or loads that failed (full disk, corrupt file)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of an engine's load, as published in load reports and metrics."""

    running: int
    waiting: int
    active_blocks: int
    total_blocks: int
    cached_blocks: int
    active_prefill_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    preemptions: int
    held_blocks: int = 0
    tiers: tuple[TierStats, ...] = ()


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
