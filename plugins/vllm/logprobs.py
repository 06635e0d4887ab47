"""Our sampling extras on vLLM: which ones map, and vLLM's logprobs as `TokenChunk` fields.

`VllmEngine.submit` calls `check_mappable` (on the caller's thread) before queueing; the loop
thread calls `chunk_logprobs` for each `RequestOutput` of a request that asked for logprobs.
vLLM's logprobs are, by default, the log-softmax of the raw logits (`logprobs_mode`
"raw_logprobs"), as ours; each position's dict holds the top k plus the sampled token, with
ranks, which become our (sampled logprob, top k likeliest first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest

Top = tuple[tuple[int, float], ...]


def check_mappable(request: GenerateRequest) -> None:
    """Refuse what vLLM cannot do as our contract says, naming the field.

    vLLM counts the presence and frequency penalties over the tokens it generated itself; a
    decode worker's first token (from the prefill worker) and a migrated request's earlier
    outputs are part of its prompt there, so those penalties would miss them.
    """
    sp = request.sampling
    if request.kv_descriptor is not None or request.output_offset:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(sp, name):
                raise ValidationError(
                    name,
                    "the vLLM engine cannot count earlier outputs after a prefill handoff or a migration",
                )


def _position(entry: dict[int, Any] | None, token: int, k: int) -> tuple[float, Top]:
    if not entry:
        return 0.0, ()
    ranked = sorted(
        (
            (lp.rank, t, lp.logprob)
            for t, lp in entry.items()
            if lp.rank is not None and lp.rank <= k
        )
    )
    chosen = entry.get(token)
    return (chosen.logprob if chosen is not None else 0.0), tuple((t, v) for _, t, v in ranked)


def output_logprobs(
    tokens: Sequence[int], logprobs: Sequence[Any] | None, k: int
) -> dict[str, tuple]:
    """TokenChunk's `logprobs` / `top_logprobs` for `tokens` from vLLM's per-token dicts."""
    if logprobs is None:
        return {}
    found = [_position(entry, t, k) for t, entry in zip(tokens, logprobs, strict=False)]
    return {
        "logprobs": tuple(lp for lp, _ in found),
        "top_logprobs": tuple(top for _, top in found),
    }


def prompt_logprobs(
    prompt: Sequence[int], logprobs: Sequence[Any] | None, k: int
) -> dict[str, tuple]:
    """TokenChunk's `prompt_logprobs` / `prompt_top_logprobs` (prompt tokens 1..) from vLLM's
    list, whose first entry (token 0) is None."""
    if not logprobs:
        return {}
    found = [
        _position(entry, t, k) for t, entry in zip(prompt[1:], list(logprobs)[1:], strict=False)
    ]
    return {
        "prompt_logprobs": tuple(lp for lp, _ in found),
        "prompt_top_logprobs": tuple(top for _, top in found),
    }
