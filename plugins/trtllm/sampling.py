"""Trident's `SamplingParams` -> keyword arguments of TensorRT-LLM's `SamplingParams`.

A pure function (no tensorrt_llm import), called by `TrtllmEngine.submit` on the caller's
thread, so a request TensorRT-LLM cannot serve as asked fails at once with a
`ValidationError` naming the field. Every field of Trident's `SamplingParams` is either
mapped here or refused when it is not at its default: a field added later is never ignored
silently.

TensorRT-LLM's side follows `tensorrt_llm/sampling_params.py` of TensorRT-LLM 1.1.0
(`plugins.trtllm.config.TRTLLM_VERSION`):
- greedy is `top_k=1` (the LLM API treats top_k None/1 with top_p None/0 as greedy), so
  temperature 0 sends `top_k=1` and no temperature; with temperature > 0 `top_p` is always
  sent (1.0 included), else top_k and top_p both unset would read as greedy;
- the end token is `end_id` (the model's first EOS; further EOS ids become stop tokens, as
  they stop generation in Trident's engines); `stop_token_ids` are TensorRT-LLM stop words
  of one token, which it removes from the output (`include_stop_str_in_output=False`);
- an unseeded request gets a seed of its own (`seed_if_unset`): the runtime's default seed
  is the same for every request;
- penalties and `min_p` keep their names; `logit_bias` becomes `embedding_bias` (returned
  here as {token id: bias}; the engine makes the [vocab] float32 tensor TensorRT-LLM takes,
  as trtllm-serve does for OpenAI's logit_bias);
- `logprobs` k asks TensorRT-LLM for max(k, 1) logprobs per token (0 means the sampled
  token's only); `prompt_logprobs` is refused (TensorRT-LLM computes them from context
  logits, whose alignment with Trident's "prompt tokens 1.." is not pinned down here);
- `structured_outputs` becomes `guided_decoding` (the keyword arguments of
  `GuidedDecodingParams`: json, json_object, regex, grammar; a choice list becomes a grammar
  of its literals), served when the LLM was built with a guided-decoding backend;
- `detokenize=False`: the router detokenizes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from trident.core.errors import ValidationError
from trident.core.types import SamplingParams

Mapper = Callable[[SamplingParams, dict[str, Any]], None]


def _greedy(params: SamplingParams) -> bool:
    return params.temperature == 0


def _temperature(params: SamplingParams, out: dict[str, Any]) -> None:
    if _greedy(params):
        out["top_k"] = 1
    else:
        out["temperature"] = float(params.temperature)


def _top_p(params: SamplingParams, out: dict[str, Any]) -> None:
    if not _greedy(params):
        out["top_p"] = float(params.top_p)


def _top_k(params: SamplingParams, out: dict[str, Any]) -> None:
    if not _greedy(params) and params.top_k > 0:
        out["top_k"] = int(params.top_k)


def _min_tokens(params: SamplingParams, out: dict[str, Any]) -> None:
    if params.min_tokens > 0:
        out["min_tokens"] = int(params.min_tokens)


def _unless(name: str, default: float) -> Mapper:
    """Send `name` under the same name when it is not `default` (Trident's no-op value)."""

    def mapper(params: SamplingParams, out: dict[str, Any]) -> None:
        value = getattr(params, name)
        if value != default:
            out[name] = float(value)

    return mapper


def _logit_bias(params: SamplingParams, out: dict[str, Any]) -> None:
    if params.logit_bias:
        bias: dict[int, float] = {}
        for token, value in params.logit_bias:
            bias[int(token)] = bias.get(int(token), 0.0) + float(value)
        out["embedding_bias"] = bias


def _logprobs(params: SamplingParams, out: dict[str, Any]) -> None:
    if params.logprobs is not None:
        out["logprobs"] = max(1, int(params.logprobs))


def _prompt_logprobs(params: SamplingParams, out: dict[str, Any]) -> None:
    if params.prompt_logprobs is not None:
        raise ValidationError(
            "prompt_logprobs", "not returned by the TensorRT-LLM engine of this worker"
        )


def _handled_elsewhere(params: SamplingParams, out: dict[str, Any]) -> None:
    pass


_MAPPERS: dict[str, Mapper] = {
    "max_tokens": lambda p, out: out.__setitem__("max_tokens", int(p.max_tokens)),
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "seed": _handled_elsewhere,
    "stop_token_ids": _handled_elsewhere,
    "ignore_eos": _handled_elsewhere,
    "min_tokens": _min_tokens,
    "presence_penalty": _unless("presence_penalty", 0.0),
    "frequency_penalty": _unless("frequency_penalty", 0.0),
    "repetition_penalty": _unless("repetition_penalty", 1.0),
    "min_p": _unless("min_p", 0.0),
    "logit_bias": _logit_bias,
    "logprobs": _logprobs,
    "prompt_logprobs": _prompt_logprobs,
    "structured_outputs": _handled_elsewhere,
}


def trtllm_sampling_kwargs(
    params: SamplingParams,
    eos_token_ids: Sequence[int],
    seed_if_unset: int,
    *,
    guided_decoding: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for `tensorrt_llm.SamplingParams` (validates `params` first)."""
    params.validate()
    out: dict[str, Any] = {"n": 1, "detokenize": False, "include_stop_str_in_output": False}
    for f in dataclasses.fields(params):
        mapper = _MAPPERS.get(f.name)
        if mapper is not None:
            mapper(params, out)
        elif getattr(params, f.name) != _default(f):
            raise ValidationError(f.name, "not supported by the TensorRT-LLM engine of this worker")
    out["seed"] = int(params.seed) if params.seed is not None else int(seed_if_unset)
    stops = list(dict.fromkeys(int(t) for t in params.stop_token_ids))
    if eos_token_ids:
        out["end_id"] = int(eos_token_ids[0])
        out["pad_id"] = int(eos_token_ids[0])
        if not params.ignore_eos:
            stops += [int(t) for t in eos_token_ids[1:] if t not in stops]
    if params.ignore_eos:
        out["ignore_eos"] = True
    if stops:
        out["stop_token_ids"] = stops
    text = getattr(params, "structured_outputs", None)
    if text is not None:
        if not guided_decoding:
            raise ValidationError(
                "structured_outputs",
                "this TensorRT-LLM worker has no guided-decoding backend (guided_decoding_backend)",
            )
        out["guided_decoding"] = guided_decoding_kwargs(text)
    return out


def guided_decoding_kwargs(text: str) -> dict[str, Any]:
    """`GuidedDecodingParams` keyword arguments for Trident's `structured_outputs` JSON text."""
    from trident.core.structured import parse_structured_outputs

    spec = parse_structured_outputs(text)
    if spec.kind == "json":
        return {"json": spec.value}  # the schema as compact JSON text
    if spec.kind == "json_object":
        return {"json_object": True}
    if spec.kind == "choice":  # one literal of the list, in xgrammar's EBNF
        return {
            "grammar": "root ::= "
            + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.value)
        }
    return {spec.kind: spec.value}  # regex, grammar


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None
