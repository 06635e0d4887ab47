from __future__ import annotations

import json

import numpy as np
import pytest

from trident.core.errors import ValidationError
from trident.core.router_io import (
    RouterDelta,
    RouterRequest,
    check_parameters,
    decode_router_outputs,
    encode_router_inputs,
    encode_router_outputs,
    json_problem,
    parse_router_inputs,
)
from trident.core.types import SamplingParams


def s(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


def test_defaults_and_text_prompt() -> None:
    req = parse_router_inputs({"text_input": s("Hello")})
    assert req.text_input == "Hello" and req.messages is None and req.input_ids is None
    assert req.sampling.max_tokens == 16 and req.sampling.temperature == 1.0
    assert req.stream is False and req.stop == ()


def test_all_optional_inputs() -> None:
    req = parse_router_inputs(
        {
            "messages": s(json.dumps([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])),
            "max_tokens": np.array([7], np.int32),
            "min_tokens": np.array([2], np.int32),
            "stream": np.array([True]),
            "temperature": np.array([0.5], np.float32),
            "top_p": np.array([0.9], np.float32),
            "top_k": np.array([40], np.int32),
            "random_seed": np.array([3], np.uint64),
            "stop": s("\n", ""),
            "stop_token_ids": np.array([5, 6], np.int32),
            "ignore_eos": np.array([True]),
            "exclude_input_in_output": np.array([True]),
            "request_id": s("abc"),
        }
    )
    assert req.messages == ({"role": "user", "content": [{"type": "text", "text": "Hi"}]},)
    sp = req.sampling
    assert (sp.max_tokens, sp.min_tokens, sp.top_k, sp.seed, sp.ignore_eos) == (7, 2, 40, 3, True)
    assert sp.temperature == pytest.approx(0.5) and sp.top_p == pytest.approx(0.9)
    assert sp.stop_token_ids == (5, 6)
    assert req.stream and req.stop == ("\n",) and req.request_id == "abc"


@pytest.mark.parametrize(
    "arrays,field",
    [
        ({}, "text_input"),
        ({"text_input": s("")}, "text_input"),
        ({"text_input": s("a"), "input_ids": np.array([1], np.int32)}, "input_ids"),
        ({"text_input": s("a"), "max_tokens": np.array([0], np.int32)}, "max_tokens"),
        ({"text_input": s("a"), "max_tokens": np.array([1, 2], np.int32)}, "max_tokens"),
        ({"text_input": s("a"), "temperature": np.array([-1.0], np.float32)}, "temperature"),
        ({"text_input": s("a"), "temperature": np.array([np.nan], np.float32)}, "temperature"),
        ({"text_input": s("a"), "top_p": np.array([0.0], np.float32)}, "top_p"),
        ({"text_input": s("a"), "top_k": np.array([-1], np.int32)}, "top_k"),
        ({"text_input": s("a"), "min_tokens": np.array([20], np.int32)}, "min_tokens"),
        ({"text_input": np.array([b"\xff"], dtype=np.object_)}, "text_input"),
        ({"messages": s("[{")}, "messages"),
        ({"messages": s("[]")}, "messages"),
        ({"messages": s('[{"role": "user", "content": 3}]')}, "messages"),
        ({"input_ids": np.array([], np.int32)}, "input_ids"),
    ],
)
def test_bad_inputs_name_the_field(arrays: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_router_inputs(arrays)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_unknown_parameters_are_refused() -> None:
    check_parameters({"triton_enable_empty_final_response": True})
    with pytest.raises(ValidationError, match="max_token: unknown input"):
        check_parameters({"max_token": 4})


def test_outputs_carry_every_field() -> None:
    delta = RouterDelta("é", (1, 2), "stop", 3, 2, 0, "decode_1")
    out = encode_router_outputs(delta)
    assert out["text_output"][0].decode() == "é"
    assert out["output_ids"].dtype == np.int32 and out["output_ids"].tolist() == [1, 2]
    assert out["finish_reason"][0] == b"stop" and out["worker"][0] == b"decode_1"
    assert [int(out[k][0]) for k in ("num_input_tokens", "num_output_tokens", "cached_tokens")] == [3, 2, 0]


@pytest.mark.parametrize(
    "prompt",
    [
        {"text_input": "Hello"},
        {"messages": ({"role": "user", "content": "é"}, {"role": "assistant", "content": ""})},
        {"input_ids": (5, 6, 7)},
    ],
)
def test_requests_round_trip_through_the_inputs(prompt: dict) -> None:
    sp = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.25, top_k=3, seed=2**40,
                        stop_token_ids=(2,), min_tokens=1, ignore_eos=True)
    request = RouterRequest(sp, stream=True, stop=("\n", "."), request_id="r-1", **prompt)
    assert parse_router_inputs(encode_router_inputs(request)) == request
    plain = RouterRequest(SamplingParams(), **prompt)
    arrays = encode_router_inputs(plain)
    assert set(arrays) == set(prompt)  # the router's defaults are not sent
    assert parse_router_inputs(arrays) == plain


def test_outputs_round_trip() -> None:
    delta = RouterDelta("é", (1, 2), "stop", 3, 2, 1, "prefill>decode")
    assert decode_router_outputs(encode_router_outputs(delta)) == delta
    empty = decode_router_outputs({"output_ids": np.array([], np.int32)})
    assert empty == RouterDelta("", (), "", 0, 0, 0, "") and not empty.final
    with pytest.raises(ValidationError, match="^text_output: is not valid UTF-8"):
        decode_router_outputs({"text_output": np.array([b"\xe9"], dtype=np.object_)})


def test_parameters_named_like_inputs_are_refused() -> None:
    """A gRPC request parameter `max_tokens` would otherwise be ignored without a word."""
    with pytest.raises(ValidationError, match="^max_tokens: was sent as a request parameter"):
        check_parameters({"max_tokens": 5})


@pytest.mark.parametrize(
    "raw,message",
    [
        ("[" * 100_000, "messages: is nested deeper than 64 levels"),  # json's stack runs out
        ('[{"role": "user", "content": "x", "k": ' + "[" * 70 + "]" * 70 + "}]", "messages: [0].k"),
        ('[{"role": "user", "content": "\\ud800"}]', "messages: [0].content is not valid Unicode"),
        ('[{"role": "user", "content": "x", "\\udc00": 1}]', "messages: [0] has a key that is not"),
        ('[{"role": "user", "content": 1' + "0" * 5000 + "}]", "messages: invalid JSON"),
    ],
)
def test_messages_json_that_cannot_travel_on_is_refused(raw: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_router_inputs({"messages": s(raw)})
    assert err.value.field == "messages" and str(err.value).startswith(message)


def test_json_problem_paths_name_the_field() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}
    assert json_problem(body) == ("messages[0].content[0].text", "is not valid Unicode text (lone surrogate)")
    assert json_problem({"a": [[[1]]]}, max_depth=3) == ("a[0][0]", "is nested deeper than 3 levels")
    assert json_problem({"a": [[1]], "b": "é"}, max_depth=3) is None
