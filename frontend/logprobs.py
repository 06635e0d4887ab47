"""OpenAI `logprobs` objects from the router's logprob outputs.

`frontend.serving` calls these on the event loop for each `RouterDelta` of a request that
asked for logprobs (chat `logprobs: true`, completions `logprobs: k`, with `echo` the
prompt's too). The router sends, per output token, its logprob, its text and the top k
alternatives flattened (`trident.core.contract.LOGPROB_OUTPUTS`); the values are the
log-softmax of the model's raw logits, before temperature, penalties or bias (vLLM's
default), floored at -9999 as OpenAI reports impossible tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trident.core.router_io import RouterDelta


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _tops(
    ids: tuple, logprobs: tuple, texts: tuple, positions: int
) -> list[list[tuple[str, float]]]:
    """The flat top-k outputs as one list of (token text, logprob) per position."""
    if not positions:
        return []
    k = len(ids) // positions
    texts = texts or ("",) * len(ids)
    return [
        list(zip(texts[i * k : (i + 1) * k], logprobs[i * k : (i + 1) * k], strict=True))
        for i in range(positions)
    ]


def chat_content(delta: RouterDelta) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` entries of the output tokens in `delta`."""
    lps = delta.output_logprobs
    tops = _tops(delta.top_logprob_ids, delta.top_logprobs, delta.top_logprob_tokens, len(lps))
    texts = delta.output_tokens or ("",) * len(lps)
    return [
        {
            "token": text,
            "logprob": lp,
            "bytes": _bytes(text),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in top],
        }
        for text, lp, top in zip(texts, lps, tops, strict=True)
    ]


@dataclass(slots=True)
class CompletionLogprobs:
    """The legacy completions `logprobs` object of one choice, built up delta by delta.

    `add` returns the part of it that a delta adds (a streamed chunk's `logprobs`);
    `text_offset` counts characters of the choice's text from its start (the echoed prompt
    included), as OpenAI and vLLM report it.
    """

    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, delta: RouterDelta, echo: bool) -> dict[str, Any]:
        part = CompletionLogprobs(self.offset)
        if echo and delta.prompt_ids:
            texts = delta.prompt_tokens
            tops = _tops(
                delta.prompt_top_logprob_ids,
                delta.prompt_top_logprobs,
                delta.prompt_top_logprob_tokens,
                len(delta.prompt_token_logprobs),
            )
            part._append(texts[0], None, None)
            for text, lp, top in zip(texts[1:], delta.prompt_token_logprobs, tops, strict=False):
                part._append(text, lp, {text: lp, **dict(top)})
        lps = delta.output_logprobs
        tops = _tops(delta.top_logprob_ids, delta.top_logprobs, delta.top_logprob_tokens, len(lps))
        for text, lp, top in zip(delta.output_tokens, lps, tops, strict=False):
            part._append(text, lp, {text: lp, **dict(top)})
        self.offset = part.offset
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self, name).extend(getattr(part, name))
        return part.body()

    def _append(self, text: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def body(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }
