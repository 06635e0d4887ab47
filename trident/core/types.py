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

MAX_LOGPROBS = 20  # top alternatives per position, at most (vLLM's default max_logprobs)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature == 0` means greedy (so does any temperature below 1e-5). `top_k <= 0`
    disables top-k. `seed` makes a request's sampling reproducible regardless of what else is
    in the batch.

    Logits processing (`plugins/torch_engine/logits.py`), in vLLM's order: `logit_bias`
    (token id, bias) pairs are added; `repetition_penalty` (HF/vLLM: over prompt and output
    tokens, positive logits divided by it, negative ones multiplied); `frequency_penalty` and
    `presence_penalty` (OpenAI: over output tokens, `logit -= count * frequency +
    (count > 0) * presence`); then temperature, top-k, `min_p` (drop tokens whose probability
    is below `min_p` times the likeliest one's) and top-p. `logprobs` asks for each output
    token's logprob and that many top alternatives (0..20); `prompt_logprobs` the same for
    every prompt token after the first. Logprobs are the log-softmax of the model's raw
    logits, before any processing (vLLM's default, "raw_logprobs").
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: str | None = None  # JSON, see trident.core.structured

    def validate(self) -> None:
        """Raise `ValidationError` naming the first invalid field."""
        if self.structured_outputs is not None:
            from trident.core.structured import parse_structured_outputs

            parse_structured_outputs(self.structured_outputs)
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2.0 <= value <= 2.0:
                raise ValidationError(name, f"must be in [-2, 2], got {value!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValidationError("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValidationError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        for pair in self.logit_bias:
            token, bias = pair
            if not isinstance(token, int) or token < 0:
                raise ValidationError("logit_bias", f"keys must be token ids >= 0, got {token!r}")
            if not _finite(bias) or not -100.0 <= bias <= 100.0:
                raise ValidationError("logit_bias", f"values must be in [-100, 100], got {bias!r} for token {token}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValidationError(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    @property
    def penalized(self) -> bool:
        """Whether a penalty applies (the sampler then needs the request's token history)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation request as an engine sees it: token ids in, token ids out.

    `kv_descriptor` is set on a decode worker when the prompt's KV was computed by a prefill
    worker (an opaque descriptor understood by `kv_manager.transfer`); `first_token`
    is then the token the prefill worker already sampled. `hold_kv` asks the engine to
    keep the prompt's blocks pinned after it finishes, for export by a prefill worker.

    `output_offset` is set when the router migrates a request: the last `output_offset`
    tokens of `input_ids` were generated by the worker that lost it, so this run's outputs
    are output positions `output_offset`, `output_offset + 1`, ... of the request (seeded
    sampling draws by position, so it continues where the lost run stopped). The router
    has already taken them off `max_tokens` and `min_tokens`.
    """

    request_id: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    hold_kv: bool = False
    kv_descriptor: bytes | None = None
    first_token: int | None = None
    output_offset: int = 0

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        """Check the prompt against the model; raise `ValidationError` naming the field."""
        from trident.core.errors import ContextLengthError

        self.sampling.validate()
        if not self.input_ids:
            raise ValidationError("prompt", "must not be empty")
        if not 0 <= self.output_offset < len(self.input_ids):
            raise ValidationError(
                "output_offset", f"must be in [0, {len(self.input_ids)}) (the prompt's length), got {self.output_offset}"
            )
        bad = [t for t in self.input_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValidationError("input_ids", f"token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        bad = [t for t in self.sampling.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValidationError("stop_token_ids", f"token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        bad = [t for t, _ in self.sampling.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise ValidationError("logit_bias", f"token id {bad[0]} outside the vocabulary [0, {vocab_size})")
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

    With `SamplingParams.logprobs`, `logprobs[i]` is the logprob of `output_ids[i]` and
    `top_logprobs[i]` the top alternatives at that position as (token id, logprob), likeliest
    first. With `prompt_logprobs`, the first chunk carries `prompt_logprobs` /
    `prompt_top_logprobs` for prompt tokens 1.. (token 0 has none), same shapes.
    """

    request_id: str
    output_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    num_input_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    kv_descriptor: bytes | None = None
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    prompt_logprobs: tuple[float, ...] = ()
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


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
    leases: int = 0  # leases of held blocks not yet released by their puller (prefill workers)
    tiers: tuple[TierStats, ...] = ()


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
