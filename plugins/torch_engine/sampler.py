"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens.

Called by the engine on the loop thread with one row of logits per sequence that samples
this step. A request with a seed owns a `torch.Generator` that is reseeded for every output
position from (seed, position), so its tokens depend only on its own logits, seed and
position: not on what else is in the batch, and not on which worker drew the earlier ones.
A request that continues elsewhere (the decode worker after a prefill handoff, or another
worker after a migration, `GenerateRequest.output_offset`) draws what one worker would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trident.core.types import SamplingParams


@dataclass(slots=True)
class SamplingState:
    """Per-sequence sampling state kept by the engine."""

    params: SamplingParams
    generator: torch.Generator | None
    banned_until_min: tuple[int, ...]  # eos + stop ids, masked while output < min_tokens
    offset: int = 0  # output positions drawn before this run (GenerateRequest.output_offset)


_MASK63 = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """The generator seed of output `position` of a request seeded with `seed` (a splitmix64
    step over both, so neighbouring positions and seeds draw unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63


def make_state(params: SamplingParams, eos_ids: Sequence[int], offset: int = 0) -> SamplingState:
    gen = torch.Generator() if params.seed is not None and params.temperature > 0 else None
    banned = tuple(sorted(set(eos_ids) | set(params.stop_token_ids))) if params.min_tokens else ()
    return SamplingState(params, gen, banned, offset)


def sample(logits: torch.Tensor, states: Sequence[SamplingState], num_outputs: Sequence[int], default_gen: torch.Generator) -> list[int]:
    """Pick one token per row of `logits` [S, vocab] (float32, on any device); `num_outputs`:
    each row's outputs so far in this run (a decode worker's count includes the first token)."""
    logits = logits.float()
    vocab = logits.shape[-1]
    for row, (st, n) in enumerate(zip(states, num_outputs, strict=True)):
        # (a ban of the whole vocabulary would leave nothing to sample: then min_tokens yields)
        if st.banned_until_min and n < st.params.min_tokens and len(st.banned_until_min) < vocab:
            logits[row, list(st.banned_until_min)] = float("-inf")
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for row, (st, n) in enumerate(zip(states, num_outputs, strict=True)):
        p = st.params
        if p.temperature == 0:
            out.append(greedy[row])
            continue
        gen = st.generator
        if gen is None:
            gen = default_gen
        else:
            assert p.seed is not None
            gen.manual_seed(position_seed(p.seed, st.offset + n))
        out.append(_sample_row(logits[row], p, gen))
    return out


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    row = row.cpu() / p.temperature
    if 0 < p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (cum - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen).item())
