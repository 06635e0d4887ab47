"""Token sampling: greedy, temperature, top-k, top-p, min_p, per-request seeds, min_tokens;
penalties, logit_bias and logprobs through `plugins.torch_engine.logits`.

Called by the runner on the engine loop thread with one row of logits per sequence that
samples this step. Logprobs are read from the raw logits first; then logit_bias, the
penalties and the min_tokens ban change the logits of every row at once, before greedy rows
take their argmax and the others sample. A request with a seed owns a `torch.Generator` that is reseeded for every output
position from (seed, position), so its tokens depend only on its own logits, seed and
position: not on what else is in the batch, and not on which worker drew the earlier ones.
A request that continues elsewhere (the decode worker after a prefill handoff, or another
worker after a migration, `GenerateRequest.output_offset`) draws what one worker would have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from plugins.torch_engine.logits import (
    TopLogprobs,
    apply_logit_bias,
    apply_penalties,
    min_p_mask,
    token_logprobs,
)
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


Logprob = tuple[float, TopLogprobs]
# Temperatures below this sample greedily (vLLM's rule): dividing logits by less overflows.
GREEDY_BELOW = 1e-5


def sample(
    logits: torch.Tensor,
    states: Sequence[SamplingState],
    num_outputs: Sequence[int],
    default_gen: torch.Generator,
    tokens: Sequence[Sequence[int]] = (),
    output_starts: Sequence[int] = (),
    argmax: Callable[[torch.Tensor], list[int]] | None = None,
) -> list[tuple[int, Logprob | None]]:
    """Pick one token per row of `logits` [S, vocab] (float32, on any device), with its
    logprobs when the row's request asks for them. `num_outputs`: each row's outputs so far
    in this run (a decode worker's count includes the first token); `tokens[i]`: row i's
    prompt and outputs, its outputs from `output_starts[i]` (for the penalties). `argmax`:
    the row-wise argmax to use in place of torch's (the runner passes the CPU kernels' one)."""
    logits = logits.float().contiguous()
    params = [st.params for st in states]
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw = logits.index_select(0, torch.tensor(wanted, device=logits.device)).clone() if wanted else None
    vocab = logits.shape[-1]
    apply_logit_bias(logits, params)
    if tokens:
        apply_penalties(logits, params, tokens, output_starts)
    for row, (st, n) in enumerate(zip(states, num_outputs, strict=True)):
        # (a ban of the whole vocabulary would leave nothing to sample: then min_tokens yields)
        if st.banned_until_min and n < st.params.min_tokens and len(st.banned_until_min) < vocab:
            logits[row, list(st.banned_until_min)] = float("-inf")
    greedy = argmax(logits) if argmax is not None else logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for row, (st, n) in enumerate(zip(states, num_outputs, strict=True)):
        p = st.params
        if p.temperature < GREEDY_BELOW:
            out.append(greedy[row])
            continue
        gen = st.generator
        if gen is None:
            gen = default_gen
        else:
            assert p.seed is not None
            gen.manual_seed(position_seed(p.seed, st.offset + n))
        out.append(_sample_row(logits[row], p, gen))
    logprobs: list[Logprob | None] = [None] * len(out)
    if raw is not None:
        found = token_logprobs(raw, [out[i] for i in wanted], [params[i].logprobs or 0 for i in wanted])
        for i, entry in zip(wanted, found, strict=True):
            logprobs[i] = entry
    return list(zip(out, logprobs, strict=True))


def _sample_row(row: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    # (+inf, from a huge logit over a small temperature, would make softmax NaN)
    row = (row.cpu() / p.temperature).clamp_(max=torch.finfo(row.dtype).max)
    if 0 < p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0:
        probs = min_p_mask(probs, p.min_p)
    if p.top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        mass = cum[-1] if p.min_p > 0 else 1.0  # min_p removed some mass: top_p is of the rest
        drop = (cum - sorted_probs) >= p.top_p * mass
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen).item())
