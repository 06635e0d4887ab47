from __future__ import annotations

import numpy as np
import pytest

from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest, SamplingParams, TokenChunk
from trident.core.worker_io import (
    AbortCommand,
    decode_chunk_outputs,
    encode_abort_inputs,
    encode_chunk_outputs,
    encode_generate_inputs,
    parse_generate_inputs,
)


def test_generate_request_round_trips() -> None:
    sp = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.8, top_k=5, seed=2**40, stop_token_ids=(3,), min_tokens=1, ignore_eos=True)
    request = GenerateRequest("r1", (5, 6, 7), sp)
    back = parse_generate_inputs(encode_generate_inputs(request), "fallback")
    assert isinstance(back, GenerateRequest)
    assert back.request_id == "r1" and back.input_ids == (5, 6, 7)
    assert back.sampling.max_tokens == 9 and back.sampling.seed == 2**40 and back.sampling.stop_token_ids == (3,)
    assert back.sampling.temperature == pytest.approx(0.7)


def test_abort_and_defaults() -> None:
    assert parse_generate_inputs(encode_abort_inputs("r9"), "x") == AbortCommand("r9")
    req = parse_generate_inputs({"input_ids": np.array([1, 2], np.int32)}, "triton-id")
    assert isinstance(req, GenerateRequest) and req.request_id == "triton-id" and req.sampling == SamplingParams()
    with pytest.raises(ValidationError, match="^input_ids: is required"):
        parse_generate_inputs({}, "x")


def test_chunk_round_trips() -> None:
    chunk = TokenChunk("r", (4, 5), True, "length", num_input_tokens=3, cached_tokens=16)
    back = decode_chunk_outputs(encode_chunk_outputs(chunk), "r")
    assert back == TokenChunk("r", (4, 5), True, "length", 3, 16)
    mid = decode_chunk_outputs(encode_chunk_outputs(TokenChunk("r", (1,))), "r")
    assert not mid.finished and mid.finish_reason is None


@pytest.mark.parametrize("temperature,sent", [(1e-38, 0.0), (9e-6, 0.0), (2e-5, 2e-5), (0.0, 0.0), (0.7, 0.7)])
def test_tiny_positive_temperatures_sample_greedily(temperature: float, sent: float) -> None:
    """Logits divided by 1e-38 overflow and softmax makes NaNs of them (failing the batch)."""
    arrays = {"input_ids": np.array([1], np.int32), "temperature": np.array([temperature], np.float32)}
    parsed = parse_generate_inputs(arrays, "r")
    assert isinstance(parsed, GenerateRequest)
    assert parsed.sampling.temperature == pytest.approx(sent)


def test_sampling_extras_round_trip() -> None:
    sp = SamplingParams(
        presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.25, min_p=0.125,
        logit_bias=((7, -100.0), (3, 2.5)), logprobs=4, prompt_logprobs=0,
    )
    back = parse_generate_inputs(encode_generate_inputs(GenerateRequest("r", (1, 2), sp)), "x")
    assert isinstance(back, GenerateRequest) and back.sampling == sp
    plain = encode_generate_inputs(GenerateRequest("r", (1, 2)))
    assert "logprobs" not in plain and "logit_bias_ids" not in plain


def test_logit_bias_halves_must_match() -> None:
    arrays = encode_generate_inputs(GenerateRequest("r", (1, 2), SamplingParams(logit_bias=((7, 1.0),))))
    arrays["logit_bias_values"] = np.array([1.0, 2.0], np.float32)
    with pytest.raises(ValidationError, match="^logit_bias_values: has 2 values for 1 logit_bias_ids"):
        parse_generate_inputs(arrays, "x")
    arrays["logit_bias_ids"] = np.array([7, 7], np.int32)
    with pytest.raises(ValidationError, match="^logit_bias_ids: must not repeat"):
        parse_generate_inputs(arrays, "x")


def test_chunk_logprobs_round_trip() -> None:
    chunk = TokenChunk(
        "r", (4, 5), True, "length", 3, 0,
        logprobs=(-0.5, -1.5), top_logprobs=(((4, -0.5), (9, -2.0)), ((5, -1.5), (1, -1.75))),
        prompt_logprobs=(-3.0, -4.0), prompt_top_logprobs=(((2, -0.25),), ((8, -0.5),)),
    )
    assert decode_chunk_outputs(encode_chunk_outputs(chunk), "r") == chunk
    with pytest.raises(ValidationError, match="^top_logprob_ids"):
        arrays = encode_chunk_outputs(chunk)
        arrays["top_logprob_ids"] = np.array([1, 2, 3], np.int32)
        decode_chunk_outputs(arrays, "r")
