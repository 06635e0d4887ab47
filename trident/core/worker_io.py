"""Tensor I/O of the worker models (`decode`, `prefill`), both ends, without Triton.

The router calls a worker over BLS with `encode_generate_inputs(request)` (or
`encode_abort_inputs`); the worker rebuilds the `GenerateRequest` with
`parse_generate_inputs`, and answers each engine `TokenChunk` with `encode_chunk_outputs`,
which the router turns back into a chunk with `decode_chunk_outputs`. The tensors are the
tables `WORKER_INPUTS` and `WORKER_OUTPUTS` in `trident.core.contract` (names, types, dims,
defaults and what each one means); this module maps them to and from the core types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trident.core.contract import SAMPLING_INPUTS, WORKER_INPUTS, WORKER_OUTPUTS, Arrays
from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest, SamplingParams, TokenChunk

# SamplingParams fields, each sent as the input of the same name (logit_bias: two inputs).
_SAMPLING_FIELDS = (
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logprobs", "prompt_logprobs",
    "structured_outputs",
)


# A positive temperature below this samples greedily, as in vLLM (its _SAMPLING_EPS). The
# engine divides the logits by the temperature: at 1e-38 they overflow to inf and softmax
# turns them into NaNs, which would fail every request batched with this one.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class AbortCommand:
    """A worker request that asks to abort another request (sent by the router)."""

    request_id: str


# ---- sampling (shared with the router's I/O) ----------------------------------------
def sampling_values(sampling: SamplingParams) -> dict[str, Any]:
    """The sampling inputs of `sampling`, by input name (None: not sent)."""
    values = {name: getattr(sampling, name) for name in _SAMPLING_FIELDS}
    bias = sampling.logit_bias
    values["logit_bias_ids"] = tuple(t for t, _ in bias) if bias else None
    values["logit_bias_values"] = tuple(b for _, b in bias) if bias else None
    return values


def sampling_params(values: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from read input values (`Contract.read(..., defaults=True)`), validated.

    `random_seed` (the router's TensorRT-LLM alias) stands in for an absent `seed`; a
    temperature in (0, GREEDY_BELOW_TEMPERATURE) becomes 0 (greedy). Called on both ends
    of every hop (`parse_router_inputs`, `parse_generate_inputs`).
    """
    fields = {name: values[name] for name in _SAMPLING_FIELDS}
    fields["logit_bias"] = _logit_bias(values.get("logit_bias_ids") or (), values.get("logit_bias_values") or ())
    if fields["seed"] is None:
        fields["seed"] = values.get("random_seed")
    temperature = fields["temperature"]
    if isinstance(temperature, float) and 0.0 < temperature < GREEDY_BELOW_TEMPERATURE:
        fields["temperature"] = 0.0
    params = SamplingParams(**fields)
    params.validate()
    return params


def _logit_bias(ids: tuple[int, ...], biases: tuple[float, ...]) -> tuple[tuple[int, float], ...]:
    if len(ids) != len(biases):
        raise ValidationError("logit_bias_values", f"has {len(biases)} values for {len(ids)} logit_bias_ids")
    if len(set(ids)) != len(ids):
        raise ValidationError("logit_bias_ids", "must not repeat a token id")
    return tuple(zip(ids, biases, strict=True))


def parse_sampling(arrays: Arrays) -> SamplingParams:
    """SamplingParams from the sampling inputs among `arrays` (errors name the field)."""
    return sampling_params(SAMPLING_INPUTS.read(arrays, defaults=True))


# ---- router -> worker ---------------------------------------------------------------
def encode_generate_inputs(request: GenerateRequest) -> dict[str, np.ndarray]:
    """The worker's input tensors for `request`; sampling values equal to the worker's
    defaults are left out (it reads the same request back, with fewer tensors per call)."""
    sampling = request.sampling
    sent = {k: v for k, v in sampling_values(sampling).items() if v != SAMPLING_INPUTS.spec(k).default}
    return WORKER_INPUTS.encode(
        {
            "input_ids": request.input_ids,
            "request_id": request.request_id,
            **sent,
            "hold_kv": True if request.hold_kv else None,
            "kv_descriptor": request.kv_descriptor,
            "first_token": None if request.kv_descriptor is None else request.first_token or 0,
            "output_offset": request.output_offset or None,
        }
    )


def encode_abort_inputs(request_id: str) -> dict[str, np.ndarray]:
    return WORKER_INPUTS.encode({"abort_request_id": request_id})


def parse_generate_inputs(arrays: Arrays, default_request_id: str) -> GenerateRequest | AbortCommand:
    """Rebuild what the router sent; raise `ValidationError` naming a bad input."""
    if "abort_request_id" in arrays:  # nothing else matters then
        return AbortCommand(WORKER_INPUTS["abort_request_id"].read(arrays["abort_request_id"]))
    if "input_ids" not in arrays:
        raise ValidationError("input_ids", "is required")
    values = WORKER_INPUTS.read(arrays, defaults=True)
    kv_descriptor, first_token = values["kv_descriptor"], values["first_token"]
    if kv_descriptor is not None and not kv_descriptor:
        raise ValidationError("kv_descriptor", "must not be empty")
    if first_token is not None and first_token < 0:
        raise ValidationError("first_token", f"must be a token id >= 0, got {first_token}")
    if (kv_descriptor is None) != (first_token is None):
        missing = "first_token" if first_token is None else "kv_descriptor"
        raise ValidationError(missing, "kv_descriptor and first_token go together")
    return GenerateRequest(
        request_id=values["request_id"] or default_request_id,
        input_ids=values["input_ids"],
        sampling=sampling_params(values),
        hold_kv=values["hold_kv"],
        kv_descriptor=kv_descriptor,
        first_token=first_token,
        output_offset=values["output_offset"],
    )


# ---- worker -> router ---------------------------------------------------------------
# ---- logprobs: per position (token id, logprob) pairs <-> flat tensors ------------------
TopLogprobs = tuple[tuple[tuple[int, float], ...], ...]


def flatten_top(top: TopLogprobs) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The k alternatives of every position, one after the other: (ids, logprobs)."""
    return tuple(t for row in top for t, _ in row), tuple(lp for row in top for _, lp in row)


def unflatten_top(ids: tuple[int, ...], logprobs: tuple[float, ...], positions: int, field: str) -> TopLogprobs:
    """The inverse of `flatten_top` for `positions` positions (k = len(ids) / positions)."""
    if len(ids) != len(logprobs) or (positions and len(ids) % positions) or (not positions and ids):
        raise ValidationError(field, f"{len(ids)} ids and {len(logprobs)} logprobs do not fit {positions} positions")
    k = len(ids) // positions if positions else 0
    return tuple(tuple(zip(ids[i * k : (i + 1) * k], logprobs[i * k : (i + 1) * k], strict=True)) for i in range(positions))


def chunk_logprob_values(chunk: TokenChunk) -> dict[str, Any]:
    """The logprob outputs of `chunk`, by output name (`LOGPROB_OUTPUTS`)."""
    top_ids, top_lps = flatten_top(chunk.top_logprobs)
    prompt_ids, prompt_lps = flatten_top(chunk.prompt_top_logprobs)
    return {
        "output_logprobs": chunk.logprobs,
        "top_logprob_ids": top_ids,
        "top_logprobs": top_lps,
        "prompt_token_logprobs": chunk.prompt_logprobs,
        "prompt_top_logprob_ids": prompt_ids,
        "prompt_top_logprobs": prompt_lps,
    }


def chunk_logprobs(values: Mapping[str, Any], num_outputs: int) -> dict[str, Any]:
    """TokenChunk's logprob fields from read output values (the inverse of `chunk_logprob_values`)."""
    logprobs, prompt = values["output_logprobs"], values["prompt_token_logprobs"]
    if logprobs and len(logprobs) != num_outputs:
        raise ValidationError("output_logprobs", f"has {len(logprobs)} values for {num_outputs} output_ids")
    top = values["top_logprob_ids"], values["top_logprobs"]
    prompt_top = values["prompt_top_logprob_ids"], values["prompt_top_logprobs"]
    return {
        "logprobs": logprobs,
        "top_logprobs": unflatten_top(*top, len(logprobs), "top_logprob_ids") if logprobs else (),
        "prompt_logprobs": prompt,
        "prompt_top_logprobs": unflatten_top(*prompt_top, len(prompt), "prompt_top_logprob_ids") if prompt else (),
    }


def encode_chunk_outputs(chunk: TokenChunk) -> dict[str, np.ndarray]:
    """The response tensors of `chunk` (its logprob outputs only when it has logprobs)."""
    return WORKER_OUTPUTS.encode_response(
        {
            "output_ids": chunk.output_ids,
            "finish_reason": chunk.finish_reason or "",
            "num_input_tokens": chunk.num_input_tokens,
            "num_output_tokens": len(chunk.output_ids),
            "cached_tokens": chunk.cached_tokens,
            "kv_descriptor": chunk.kv_descriptor or b"",
            **chunk_logprob_values(chunk),
        }
    )


def decode_chunk_outputs(arrays: Arrays, request_id: str) -> TokenChunk:
    values = WORKER_OUTPUTS.read(arrays, defaults=True)
    reason = values["finish_reason"] or None
    return TokenChunk(
        request_id=request_id,
        output_ids=values["output_ids"],
        finished=reason is not None,
        finish_reason=reason,
        num_input_tokens=values["num_input_tokens"],
        cached_tokens=values["cached_tokens"],
        kv_descriptor=values["kv_descriptor"] or None,
        **chunk_logprobs(values, len(values["output_ids"])),
    )
