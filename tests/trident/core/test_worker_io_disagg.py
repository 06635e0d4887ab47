"""Worker I/O of a disaggregated handoff: hold_kv in, kv_descriptor out; kv_descriptor + first_token in."""

from __future__ import annotations

import numpy as np
import pytest

from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest, SamplingParams, TokenChunk
from trident.core.worker_io import (
    WORKER_INPUTS,
    WORKER_OUTPUTS,
    decode_chunk_outputs,
    encode_chunk_outputs,
    encode_generate_inputs,
    parse_generate_inputs,
)

DESCRIPTOR = b"\x01\x89\x00binary\xff"  # not UTF-8: travels as raw bytes


def test_prefill_and_decode_requests_round_trip() -> None:
    prefill = GenerateRequest("r", (5, 6, 7), SamplingParams(max_tokens=1), hold_kv=True)
    back = parse_generate_inputs(encode_generate_inputs(prefill), "x")
    assert isinstance(back, GenerateRequest) and back.hold_kv and back.kv_descriptor is None
    decode = GenerateRequest("r", (5, 6, 7), SamplingParams(max_tokens=9), kv_descriptor=DESCRIPTOR, first_token=42)
    arrays = encode_generate_inputs(decode)
    assert set(arrays) <= set(WORKER_INPUTS)
    back = parse_generate_inputs(arrays, "x")
    assert isinstance(back, GenerateRequest)
    assert (back.kv_descriptor, back.first_token, back.hold_kv) == (DESCRIPTOR, 42, False)
    plain = encode_generate_inputs(GenerateRequest("r", (1,)))
    assert not {"hold_kv", "kv_descriptor", "first_token"} & set(plain)


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"kv_descriptor": np.array([DESCRIPTOR], dtype=np.object_)}, "first_token"),
        ({"first_token": np.array([3], np.int32)}, "kv_descriptor"),
        ({"kv_descriptor": np.array([b""], dtype=np.object_), "first_token": np.array([3], np.int32)}, "kv_descriptor"),
        ({"kv_descriptor": np.array([DESCRIPTOR], dtype=np.object_), "first_token": np.array([-1], np.int32)}, "first_token"),
        ({"hold_kv": np.array([7], np.int32)}, "hold_kv"),
    ],
)
def test_bad_handoff_inputs_name_the_field(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_generate_inputs({"input_ids": np.array([1, 2], np.int32), **extra}, "x")
    assert err.value.field == field


def test_descriptor_output_round_trips() -> None:
    last = TokenChunk("r", (4,), True, "length", 3, 0, kv_descriptor=DESCRIPTOR)
    arrays = encode_chunk_outputs(last)
    assert set(arrays) == {s.name for s in WORKER_OUTPUTS.specs if not s.optional}  # no logprobs asked
    assert decode_chunk_outputs(arrays, "r") == last
    mid = decode_chunk_outputs(encode_chunk_outputs(TokenChunk("r", (1,))), "r")
    assert mid.kv_descriptor is None  # b"" on every other response
