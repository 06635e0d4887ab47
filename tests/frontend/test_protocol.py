"""Request validation: every rejected body names the field the client got wrong."""

from __future__ import annotations

import json

import pytest

from frontend.errors import APIError, from_triton_message
from frontend.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    max_tokens_of,
    parse_body,
    router_param_map,
    to_router_requests,
    validate_chat,
    validate_completion,
)
from trident.core.errors import ValidationError
from trident.core.router_io import encode_router_inputs, parse_router_inputs
from trident.core.types import SamplingParams

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _chat(**overrides: object) -> bytes:
    return json.dumps({**CHAT, **overrides}).encode()


def _reject(raw: bytes, kind: type = ChatCompletionRequest, max_n: int = 4) -> APIError:
    with pytest.raises(APIError) as info:
        req = parse_body(raw, kind)
        if kind is ChatCompletionRequest:
            validate_chat(req, max_n)
        else:
            validate_completion(req, max_n)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"", "invalid_json"),
    ],
)
def test_malformed_json_is_a_400(raw: bytes, code: str) -> None:
    assert _reject(raw).code == code


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # json's own stack runs out
        b'{"model": "m", "max_tokens": 1' + b"0" * 5000 + b"}",  # int() refuses 4,300+ digits
    ],
    ids=["deep", "digits"],
)
def test_json_that_python_cannot_parse_is_a_400_not_a_500(raw: bytes) -> None:
    assert _reject(raw).code == "invalid_json"


def test_json_nested_past_the_limit_names_the_field() -> None:
    deep = _reject(_chat(user=json.loads("[" * 70 + "]" * 70)))
    assert deep.param.startswith("user") and "nested deeper than 64 levels" in deep.message


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": 3}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"1": "5"}}, "logit_bias.1"),
        # INT32 inputs: numpy would wrap these silently (2**40 tokens became 0, top_k 2**40 off)
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"max_completion_tokens": 2**31}, "max_completion_tokens"),
        ({"min_tokens": 2**40}, "min_tokens"),
        ({"top_k": 2**40}, "top_k"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        ({"user": "a\udfffb"}, "user"),
        ({"stream_options": {"\ud800": True}}, "stream_options"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logit_bias": {"x": 5}}, "logit_bias"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": 7}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_bad_chat_field_is_named(overrides: dict[str, object], param: str) -> None:
    err = _reject(_chat(**overrides))
    assert err.param == param, err.message
    assert err.message.startswith(param.split("[")[0]) or param in err.message


def test_missing_messages_is_named() -> None:
    err = _reject(json.dumps({"model": "m"}).encode())
    assert err.param == "messages" and "required" in err.message


def test_chat_messages_are_flattened_for_the_router() -> None:
    req = parse_body(
        _chat(
            messages=[
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ]
        ),
        ChatCompletionRequest,
    )
    assert validate_chat(req, 1) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


def test_unknown_fields_are_ignored() -> None:
    req = parse_body(_chat(some_future_field={"x": 1}), ChatCompletionRequest)
    assert validate_chat(req, 1)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": [-1]}, "prompt"),
        ({"model": "m", "prompt": "x", "echo": "no"}, "echo"),
        ({"model": "m", "prompt": [1, 2], "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "m", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
        ({"model": "m", "prompt": "x", "logprobs": -1}, "logprobs"),
    ],
)
def test_bad_completion_field_is_named(body: dict[str, object], param: str) -> None:
    err = _reject(json.dumps(body).encode(), CompletionRequest)
    assert err.param == param, err.message


def test_completion_prompts_expand_to_one_router_request_per_choice() -> None:
    req = parse_body(
        json.dumps(
            {"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 7, "stop": "x", "top_k": -1}
        ).encode(),
        CompletionRequest,
    )
    prompts = validate_completion(req, 4)
    routed = to_router_requests(req, prompts, None, "cmpl-1", default_max_tokens=None)
    assert [r.text_input for r in routed] == ["a", "a", "b", "b"]
    assert [r.sampling.seed for r in routed] == [7, 8, 7, 8]
    assert [r.request_id for r in routed] == ["cmpl-1-0", "cmpl-1-1", "cmpl-1-2", "cmpl-1-3"]
    default_budget = SamplingParams().max_tokens  # not sent by the client: the router's default
    assert all(
        r.stop == ("x",) and r.sampling.top_k == 0 and r.sampling.max_tokens == default_budget
        for r in routed
    )


def test_token_prompts_go_as_input_ids() -> None:
    req = parse_body(
        json.dumps({"model": "m", "prompt": [[1, 2], [3]]}).encode(), CompletionRequest
    )
    routed = to_router_requests(req, validate_completion(req, 1), None, "c", None)
    assert [r.input_ids for r in routed] == [(1, 2), (3,)]
    single = parse_body(json.dumps({"model": "m", "prompt": [5, 6, 7]}).encode(), CompletionRequest)
    assert to_router_requests(single, validate_completion(single, 1), None, "c", None)[
        0
    ].input_ids == (5, 6, 7)


def test_max_completion_tokens_wins_and_names_the_param() -> None:
    req = parse_body(_chat(max_tokens=5, max_completion_tokens=9), ChatCompletionRequest)
    assert max_tokens_of(req, 100) == (9, "max_completion_tokens")
    assert router_param_map(req, chat=True)["max_tokens"] == "max_completion_tokens"
    assert router_param_map(req, chat=True)["text_input"] == "messages"
    plain = parse_body(_chat(), ChatCompletionRequest)
    assert max_tokens_of(plain, 64) == (64, "max_tokens")
    routed = to_router_requests(plain, None, validate_chat(plain, 1), "r", 64)
    assert (
        routed[0].sampling.max_tokens == 64 and list(routed[0].messages or ()) == CHAT["messages"]
    )


def test_router_requests_reach_the_router_unchanged() -> None:
    """What the frontend sends is what the router model parses (no Triton in between)."""
    req = parse_body(
        _chat(temperature=0.5, top_k=-1, seed=3, stop=["\n"], min_tokens=2, stream=True),
        ChatCompletionRequest,
    )
    (routed,) = to_router_requests(req, None, validate_chat(req, 1), "chatcmpl-1", None)
    assert parse_router_inputs(encode_router_inputs(routed)) == routed
    assert routed.sampling == SamplingParams(temperature=0.5, top_k=0, seed=3, min_tokens=2)
    assert routed.stream and routed.stop == ("\n",) and routed.request_id == "chatcmpl-1"


def test_router_errors_name_the_openai_field() -> None:
    """A value only the router rejects still comes back as a 400 naming the client's field."""
    req = parse_body(_chat(max_completion_tokens=4, min_tokens=9), ChatCompletionRequest)
    (routed,) = to_router_requests(req, None, validate_chat(req, 1), "r", None)
    with pytest.raises(ValidationError) as err:
        parse_router_inputs(encode_router_inputs(routed))
    mapped = from_triton_message(f"Python backend error: {err.value}", router_param_map(req, True))
    assert (mapped.status, mapped.param) == (400, "min_tokens")
    req = parse_body(_chat(max_completion_tokens=5000), ChatCompletionRequest)
    too_long = from_triton_message(
        "max_tokens: prompt (10 tokens) + max_tokens (5000) exceeds the model's context length",
        router_param_map(req, True),
    )
    assert (too_long.param, too_long.code) == ("max_completion_tokens", "context_length_exceeded")


def test_sampling_fields_reach_the_router_request() -> None:
    body = _chat(
        logprobs=True, top_logprobs=3, presence_penalty=0.5, frequency_penalty=-1.0,
        repetition_penalty=1.2, min_p=0.1, logit_bias={"7": -100, "12": 2.5},
    )
    req = parse_body(body, ChatCompletionRequest)
    (routed,) = to_router_requests(req, None, validate_chat(req, 1), "c", default_max_tokens=None)
    sp = routed.sampling
    assert (sp.logprobs, sp.prompt_logprobs) == (3, None)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_p) == (0.5, -1.0, 1.2, 0.1)
    assert sp.logit_bias == ((7, -100), (12, 2.5))


def test_completion_echo_with_logprobs_asks_for_prompt_logprobs() -> None:
    for echo, prompt_logprobs in ((True, 2), (False, None)):
        body = json.dumps({"model": "m", "prompt": "x", "logprobs": 2, "echo": echo}).encode()
        req = parse_body(body, CompletionRequest)
        (routed,) = to_router_requests(req, validate_completion(req, 1), None, "c", None)
        assert (routed.sampling.logprobs, routed.sampling.prompt_logprobs) == (2, prompt_logprobs)
