"""Logits processing and logprobs of the torch engine, batched over the rows of one step.

`sampler.sample` calls these on the engine loop thread with the [S, vocab] float32 logits of
the rows that sample this step (and the runner calls `token_logprobs` for prompt rows). Each
function works on all rows that need it at once: per-row parameters become tensors, token
histories become one tensor of flat indices `row * vocab + token`, and the penalties are
gathered, scattered and added (`index_add_`) at those indices only; there is no Python loop
over tokens, and no [S, vocab] temporary.

The order is vLLM's: `logit_bias` is added, then the repetition penalty (HF/vLLM: a token
seen in the prompt or the output has a positive logit divided by the penalty and a negative
one multiplied by it), then the frequency and presence penalties (OpenAI: over the output so
far, `logit[j] -= count[j] * frequency + (count[j] > 0) * presence`). Temperature comes after
all of them; `min_p_mask` acts on the probabilities after temperature. Logprobs are taken
from the raw logits, before any of this (vLLM's default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trident.core.types import SamplingParams

# The floor of a reported logprob: -inf (a probability that underflows) cannot travel as FP32
# in the contract, and OpenAI reports such tokens at -9999.
LOGPROB_FLOOR = -9999.0

TopLogprobs = tuple[tuple[int, float], ...]


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add each row's `logit_bias` to its logits, in place."""
    rows: list[int] = []
    ids: list[int] = []
    biases: list[float] = []
    for row, p in enumerate(params):
        if p.logit_bias:
            rows.extend([row] * len(p.logit_bias))
            ids.extend(t for t, _ in p.logit_bias)
            biases.extend(b for _, b in p.logit_bias)
    if not rows:
        return
    dev = logits.device
    index = (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev))
    logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=dev), accumulate=True)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    tokens: Sequence[Sequence[int]],
    output_starts: Sequence[int],
) -> None:
    """Apply the repetition, frequency and presence penalties to `logits` [S, vocab]
    (contiguous), in place.

    `tokens[i]` is row i's prompt followed by its outputs so far; its outputs start at
    `output_starts[i]` (earlier outputs of a migrated request and a prefill worker's first
    token are outputs too). Rows without penalties are left alone. Only the logits of tokens
    that occurred are touched: their flat indices `row * vocab + token` are gathered,
    changed and written back, so the cost follows the histories' length, not the vocabulary.
    """
    flat_logits = logits.view(-1)
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        index, rows = _occurrences(logits, rep, tokens, [0] * len(params))
        index, inverse = torch.unique(index, return_inverse=True)
        row_of = torch.empty_like(index).scatter_(0, inverse, rows)
        penalty = _per_row(logits, [params[i].repetition_penalty for i in rep])[row_of]
        values = flat_logits[index]
        big = torch.finfo(logits.dtype).max  # a tiny penalty must not overflow a logit to inf
        flat_logits[index] = torch.where(values > 0, values / penalty, values * penalty).clamp_(-big, big)
    out = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    if out:
        index, rows = _occurrences(logits, out, tokens, output_starts)
        if not len(index):
            return
        frequency = _per_row(logits, [params[i].frequency_penalty for i in out])
        flat_logits.index_add_(0, index, -frequency[rows])  # once per occurrence: count * frequency
        index, inverse = torch.unique(index, return_inverse=True)
        row_of = torch.empty_like(index).scatter_(0, inverse, rows)
        presence = _per_row(logits, [params[i].presence_penalty for i in out])
        flat_logits.index_add_(0, index, -presence[row_of])  # once per distinct token


def _per_row(logits: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=logits.dtype, device=logits.device)


def _occurrences(
    logits: torch.Tensor,
    rows: Sequence[int],
    tokens: Sequence[Sequence[int]],
    starts: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices `row * vocab + token` of every token of `tokens[row][starts[row]:]` for
    `rows`, and for each the position of its row in `rows`."""
    flat: list[int] = []
    lengths: list[int] = []
    for row in rows:
        history = tokens[row][starts[row] :]
        flat.extend(history)
        lengths.append(len(history))
    dev, vocab = logits.device, logits.shape[-1]
    which = torch.repeat_interleave(
        torch.arange(len(rows), device=dev), torch.tensor(lengths, device=dev)
    )
    base = torch.tensor(rows, device=dev)[which] * vocab
    return base + torch.tensor(flat, dtype=torch.long, device=dev), which


def min_p_mask(probs: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """`probs` ([..., vocab]) with the tokens below `min_p` times the row's largest
    probability set to 0 (the likeliest token always stays); `min_p` is a float or [R, 1]."""
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return probs.masked_fill(probs < threshold, 0.0)


def token_logprobs(
    logits: torch.Tensor, targets: Sequence[int], ks: Sequence[int]
) -> list[tuple[float, TopLogprobs]]:
    """For each row of raw `logits` [R, vocab]: the log-softmax of `targets[r]` and the
    `ks[r]` likeliest tokens as (token id, logprob), likeliest first."""
    if not len(targets):
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp_min_(LOGPROB_FLOOR)
    index = torch.tensor(targets, device=logits.device)[:, None]
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    kmax = max(ks)
    if not kmax:
        return [(lp, ()) for lp in chosen]
    top = torch.topk(logprobs, kmax, dim=-1)
    values, ids = top.values.tolist(), top.indices.tolist()
    return [
        (lp, tuple(zip(ids[r][:k], values[r][:k], strict=True)))
        for r, (lp, k) in enumerate(zip(chosen, ks, strict=True))
    ]
