"""Trident's SamplingParams -> keyword arguments of TensorRT-LLM's SamplingParams.

The expected arguments follow the field names and greedy rule of `tensorrt_llm/sampling_params.py`
(TensorRT-LLM 1.1.0: `_greedy_decoding` is top_k None/1 with top_p None/0; stop words are
removed from the output unless `include_stop_str_in_output`; `GuidedDecodingParams` takes
json, json_object, regex, grammar) and trtllm-serve's logit_bias -> embedding_bias. TensorRT-LLM
is not installed here, so the arguments are checked as data.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from plugins.trtllm.sampling import _MAPPERS, trtllm_sampling_kwargs
from trident.core.errors import ValidationError
from trident.core.types import SamplingParams

EOS = (2,)


def test_greedy_is_top_k_one_without_temperature() -> None:
    kw = trtllm_sampling_kwargs(
        SamplingParams(max_tokens=8, temperature=0, top_p=0.5, top_k=7), EOS, 99
    )
    assert kw["top_k"] == 1 and "temperature" not in kw and "top_p" not in kw
    assert kw["max_tokens"] == 8 and kw["n"] == 1 and kw["detokenize"] is False
    assert kw["end_id"] == 2 and kw["pad_id"] == 2 and kw["seed"] == 99
    assert kw["include_stop_str_in_output"] is False


def test_sampling_always_sends_top_p_so_it_is_not_read_as_greedy() -> None:
    kw = trtllm_sampling_kwargs(SamplingParams(temperature=0.7), EOS, 1)
    assert (
        kw["temperature"] == 0.7 and kw["top_p"] == 1.0 and "top_k" not in kw
    )  # top_k 0: disabled
    kw = trtllm_sampling_kwargs(
        SamplingParams(temperature=1.0, top_p=0.9, top_k=40, seed=5), EOS, 1
    )
    assert (kw["top_p"], kw["top_k"], kw["seed"]) == (0.9, 40, 5)


def test_stop_tokens_min_tokens_and_extra_eos() -> None:
    kw = trtllm_sampling_kwargs(SamplingParams(stop_token_ids=(7, 9, 7), min_tokens=3), (2, 11), 1)
    assert kw["stop_token_ids"] == [7, 9, 11] and kw["min_tokens"] == 3 and kw["end_id"] == 2
    # ignore_eos: no extra EOS stop word, TensorRT-LLM's own ignore_eos
    kw = trtllm_sampling_kwargs(SamplingParams(ignore_eos=True), (2, 11), 1)
    assert kw["ignore_eos"] is True and "stop_token_ids" not in kw and "min_tokens" not in kw


def test_invalid_params_name_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        trtllm_sampling_kwargs(SamplingParams(top_p=0.0), EOS, 1)
    assert err.value.field == "top_p"


def test_penalties_min_p_and_logit_bias() -> None:
    kw = trtllm_sampling_kwargs(SamplingParams(), EOS, 1)
    assert not {
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_p",
        "embedding_bias",
    } & set(kw)
    params = SamplingParams(
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.2,
        min_p=0.1,
        logit_bias=((5, 2.0), (9, -100.0), (5, 1.0)),
    )
    kw = trtllm_sampling_kwargs(params, EOS, 1)
    assert (
        kw["presence_penalty"],
        kw["frequency_penalty"],
        kw["repetition_penalty"],
        kw["min_p"],
    ) == (0.5, -1.0, 1.2, 0.1)
    assert kw["embedding_bias"] == {
        5: 3.0,
        9: -100.0,
    }  # repeated ids add up, as one dict entry would


def test_logprobs_and_prompt_logprobs() -> None:
    assert (
        trtllm_sampling_kwargs(SamplingParams(logprobs=0), EOS, 1)["logprobs"] == 1
    )  # the sampled token's
    assert trtllm_sampling_kwargs(SamplingParams(logprobs=5), EOS, 1)["logprobs"] == 5
    assert "logprobs" not in trtllm_sampling_kwargs(SamplingParams(), EOS, 1)
    with pytest.raises(ValidationError) as err:
        trtllm_sampling_kwargs(SamplingParams(prompt_logprobs=1), EOS, 1)
    assert err.value.field == "prompt_logprobs"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"json": {"type": "object"}}, {"json": '{"type":"object"}'}),
        ({"json_object": True}, {"json_object": True}),
        ({"regex": "[a-z]+"}, {"regex": "[a-z]+"}),
        ({"grammar": 'root ::= "yes"'}, {"grammar": 'root ::= "yes"'}),
        ({"choice": ["yes", 'say "no"']}, {"grammar": 'root ::= "yes" | "say \\"no\\""'}),
    ],
)
def test_structured_outputs_become_guided_decoding(spec, expected) -> None:
    params = SamplingParams(structured_outputs=json.dumps(spec))
    assert (
        trtllm_sampling_kwargs(params, EOS, 1, guided_decoding=True)["guided_decoding"] == expected
    )
    with pytest.raises(ValidationError) as err:
        trtllm_sampling_kwargs(params, EOS, 1, guided_decoding=False)
    assert err.value.field == "structured_outputs"


def test_a_field_this_engine_does_not_know_is_refused_when_set() -> None:
    extended = dataclasses.make_dataclass(
        "ExtendedSampling",
        [("beam_width", int, 1)],
        bases=(SamplingParams,),
        frozen=True,
        slots=True,
    )
    assert "beam_width" not in _MAPPERS
    trtllm_sampling_kwargs(extended(), EOS, 1)  # at its default: nothing to map
    with pytest.raises(ValidationError) as err:
        trtllm_sampling_kwargs(extended(beam_width=4), EOS, 1)
    assert err.value.field == "beam_width"
