"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, min_tokens.

Called by the engine on the loop thread with one row of logits per sequence that samples
this step. A request with a seed owns a `torch.Generator` seeded once, so its tokens depend
only on its own logits and seed, not on what else is in the batch.
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


def make_state(params: SamplingParams, eos_ids: Sequence[int]) -> SamplingState:
    gen = None
    if params.seed is not None and params.temperature > 0:
        gen = torch.Generator()
        gen.manual_seed(params.seed)
    banned = tuple(sorted(set(eos_ids) | set(params.stop_token_ids))) if params.min_tokens else ()
    return SamplingState(params, gen, banned)


def sample(logits: torch.Tensor, states: Sequence[SamplingState], num_outputs: Sequence[int], default_gen: torch.Generator) -> list[int]:
    """Pick one token per row of `logits` [S, vocab] (float32, on any device)."""
    logits = logits.float()
    for row, (st, n) in enumerate(zip(states, num_outputs, strict=True)):
        if st.banned_until_min and n < st.params.min_tokens:
            logits[row, list(st.banned_until_min)] = float("-inf")
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for row, st in enumerate(states):
        p = st.params
        if p.temperature == 0:
            out.append(greedy[row])
            continue
        out.append(_sample_row(logits[row], p, st.generator or default_gen))
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
