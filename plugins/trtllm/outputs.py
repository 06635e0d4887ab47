"""TensorRT-LLM's streamed `RequestOutput`s -> Trident `TokenChunk`s, one tracker per request.

`TrtllmEngine`'s loop thread feeds each `RequestOutput` that `generate_async(...,
streaming=True)` yields to the request's `OutputTracker.update`, and sends the chunk it
returns (if any) to the request's sink. Pure: the outputs are read by attribute only, as
documented for `tensorrt_llm/executor/result.py` (`RequestOutput.outputs[0]` a
`CompletionOutput` with cumulative `token_ids`, `finish_reason` in 'stop' | 'length' |
'timeout' | 'cancelled', `stop_reason`, `disaggregated_params`; `RequestOutput.finished`)
in TensorRT-LLM 1.1.0.

The contract's rules on top of TensorRT-LLM's outputs:
- a token that ends the request is not output: TensorRT-LLM already drops stop words
  (`include_stop_str_in_output=False`); an end id at the end of a 'stop' is dropped here;
- a generation-only request's outputs start with the first token, which the prefill worker
  already streamed: it is skipped;
- 'cancelled' is "abort", 'timeout' an error;
- with `logprobs` k, `CompletionOutput.logprobs` (one {token id: Logprob(logprob, rank)} per
  output token, cumulative like `token_ids`) gives each sent token's logprob and its k
  likeliest alternatives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from trident.core.types import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, TokenChunk

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": FINISH_STOP,
    "length": FINISH_LENGTH,
    "cancelled": FINISH_ABORT,
    "timeout": FINISH_ERROR,
}


class OutputTracker:
    """The part of one request's output already sent. Used on the engine's loop thread."""

    def __init__(
        self,
        request_id: str,
        num_input_tokens: int,
        eos_token_ids: Sequence[int],
        *,
        ignore_eos: bool = False,
        first_token: int | None = None,
        logprobs: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.num_input_tokens = num_input_tokens
        self._eos = () if ignore_eos else tuple(eos_token_ids)
        self._first_token = first_token  # a generation-only request's, not sent again
        self._logprobs = logprobs  # alternatives per token; None = no logprobs
        self._sent = 0
        self._started = False
        self.finished = False
        self.disaggregated_params: Any = None

    @property
    def sent(self) -> int:
        return self._sent

    def update(self, result: Any) -> TokenChunk | None:
        """The chunk for this output (None if it adds nothing); the final one once finished."""
        if self.finished:
            return None
        completion = result.outputs[0] if result.outputs else None
        tokens = list(completion.token_ids or ()) if completion is not None else []
        if not self._started and tokens:
            self._started = True
            if self._first_token is not None and tokens[0] == self._first_token:
                self._sent = 1
        cached = min(int(getattr(result, "cached_tokens", 0) or 0), self.num_input_tokens)
        if not result.finished:
            chunk = self._chunk(completion, tokens, cached)
            return chunk if chunk.output_ids else None
        self.finished = True
        raw = completion.finish_reason if completion is not None else None
        reason = FINISH_REASONS.get(raw, FINISH_STOP) if raw is not None else FINISH_STOP
        if (
            reason == FINISH_STOP
            and len(tokens) > self._sent
            and tokens[-1] in self._eos
            and getattr(completion, "stop_reason", None) is None
        ):
            tokens = tokens[:-1]
        if completion is not None:
            self.disaggregated_params = getattr(completion, "disaggregated_params", None)
        error = "TensorRT-LLM timed out the request" if raw == "timeout" else None
        return self._chunk(completion, tokens, cached, reason, error)

    def _chunk(
        self,
        completion: Any,
        tokens: list[int],
        cached: int,
        reason: str | None = None,
        error: str | None = None,
    ) -> TokenChunk:
        start, end = self._sent, max(self._sent, len(tokens))
        self._sent = end
        logprobs, top = self._logprobs_of(completion, tokens, start, end)
        return TokenChunk(
            self.request_id,
            tuple(tokens[start:end]),
            reason is not None,
            reason,
            self.num_input_tokens,
            cached,
            error,
            logprobs=logprobs,
            top_logprobs=top,
        )

    def _logprobs_of(
        self, completion: Any, tokens: list[int], start: int, end: int
    ) -> tuple[tuple, tuple]:
        if self._logprobs is None or start == end:
            return (), ()
        entries = list(getattr(completion, "logprobs", None) or ())[start:end]
        picked, top = [], []
        for token, entry in zip(tokens[start:end], entries, strict=False):
            values = (
                {int(t): _value(v) for t, v in entry.items()} if isinstance(entry, Mapping) else {}
            )
            if token not in values:
                break
            picked.append(values[token])
            ranked = sorted(values.items(), key=lambda kv: -kv[1])[: self._logprobs]
            top.append(tuple(ranked))
        if len(picked) != end - start:
            logger.warning(
                "request %s: TensorRT-LLM returned no logprob for some tokens", self.request_id
            )
            return (), ()
        return tuple(picked), tuple(top)

    def abort_chunk(self, error: str | None = None) -> TokenChunk:
        """The final chunk of a request that ends without TensorRT-LLM's final output."""
        self.finished = True
        reason = FINISH_ERROR if error else FINISH_ABORT
        return TokenChunk(self.request_id, (), True, reason, self.num_input_tokens, 0, error)


def _value(logprob: Any) -> float:
    """A `Logprob(logprob, rank)` or a bare float."""
    return float(getattr(logprob, "logprob", logprob))
