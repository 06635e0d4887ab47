"""The logits module and the sampler on hand-computed logits: penalties as OpenAI and vLLM
document them, logit_bias, min_p, and logprobs as log-softmax of the raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from plugins.torch_engine.logits import (
    apply_logit_bias,
    apply_penalties,
    min_p_mask,
    token_logprobs,
)
from plugins.torch_engine.sampler import make_state, sample
from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest, SamplingParams

LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]


def _logits(rows: int = 1) -> torch.Tensor:
    return torch.tensor([LOGITS] * rows)


def test_frequency_and_presence_penalties_follow_openai() -> None:
    """logit[j] -= count[j] * frequency + (count[j] > 0) * presence, over the output only."""
    logits = _logits()
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)]
    # prompt (0, 0, 0, 5) then outputs 3, 3, 1: token 0 is in the prompt only
    apply_penalties(logits, params, [[0, 0, 0, 5, 3, 3, 1]], [4])
    expected = list(LOGITS)
    expected[3] -= 2 * 0.5 + 0.25
    expected[1] -= 1 * 0.5 + 0.25
    assert logits[0].tolist() == pytest.approx(expected)


def test_negative_penalties_raise_repeated_tokens() -> None:
    logits = _logits()
    apply_penalties(
        logits, [SamplingParams(frequency_penalty=-1.0, presence_penalty=-2.0)], [[2, 2]], [0]
    )
    assert logits[0, 2].item() == pytest.approx(0.5 + 2 * 1.0 + 2.0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    """HF/vLLM: over prompt and output tokens, each seen token counted once."""
    logits = _logits()
    apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 1, 1, 3]], [2])
    expected = list(LOGITS)
    expected[0] = 2.0 / 2  # a prompt token
    expected[1] = -1.0 * 2  # negative: multiplied
    expected[3] = 3.0 / 2  # an output token
    assert logits[0].tolist() == pytest.approx(expected)


def test_penalties_apply_per_row_and_leave_other_rows_alone() -> None:
    logits = _logits(3)
    params = [
        SamplingParams(),
        SamplingParams(presence_penalty=1.0),
        SamplingParams(repetition_penalty=0.5),
    ]
    apply_penalties(logits, params, [[0, 1], [5], [5, 4]], [0, 0, 1])
    assert logits[0].tolist() == pytest.approx(LOGITS)
    assert logits[1].tolist() == pytest.approx([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
    # penalty 0.5 < 1 favours seen tokens: 1.0 / 0.5 = 2, -2.0 * 0.5 = -1
    assert logits[2].tolist() == pytest.approx([2.0, -1.0, 0.5, 3.0, -1.0, 2.0])


def test_logit_bias_is_added_per_row() -> None:
    logits = _logits(2)
    apply_logit_bias(logits, [SamplingParams(logit_bias=((4, 100.0), (0, -1.5))), SamplingParams()])
    assert logits[0].tolist() == pytest.approx([0.5, -1.0, 0.5, 3.0, 98.0, 1.0])
    assert logits[1].tolist() == pytest.approx(LOGITS)


def test_min_p_drops_tokens_below_a_share_of_the_likeliest() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert min_p_mask(probs, 0.2).tolist() == pytest.approx([0.5, 0.3, 0.15, 0.0])
    assert min_p_mask(probs, 0.7).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert min_p_mask(probs, 1.0).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])


def test_token_logprobs_are_log_softmax_with_the_top_k() -> None:
    logits = torch.tensor(LOGITS)
    norm = math.log(sum(math.exp(x) for x in LOGITS))
    ((lp, top),) = token_logprobs(logits[None], [2], [3])
    assert lp == pytest.approx(0.5 - norm)
    assert [t for t, _ in top] == [3, 0, 5]
    assert [v for _, v in top] == pytest.approx([3.0 - norm, 2.0 - norm, 1.0 - norm])
    assert token_logprobs(logits[None], [2], [0])[0][1] == ()


def _sample(logits: torch.Tensor, params: list[SamplingParams], tokens=(), starts=()):
    states = [make_state(p, eos_ids=(), offset=0) for p in params]
    gen = torch.Generator().manual_seed(0)
    return sample(logits, states, [0] * len(params), gen, tokens, starts)


def test_logit_bias_forces_a_token_and_logprobs_stay_raw() -> None:
    ((token, (lp, top)),) = _sample(
        _logits(), [SamplingParams(temperature=0, logit_bias=((4, 100.0),), logprobs=2)]
    )
    assert token == 4
    norm = math.log(sum(math.exp(x) for x in LOGITS))
    assert lp == pytest.approx(-2.0 - norm)  # the model's own logprob, before the bias
    assert [t for t, _ in top] == [3, 0]


def test_penalties_change_the_greedy_choice() -> None:
    ((token, lp),) = _sample(
        _logits(), [SamplingParams(temperature=0, presence_penalty=2.0)], [[3]], [0]
    )
    assert token == 0 and lp is None  # 3.0 - 2 = 1.0 < 2.0


def test_extreme_penalties_and_temperatures_still_sample() -> None:
    """A tiny repetition penalty (positive logits divided by 1e-45) or temperature would
    overflow the logits to inf and the softmax to NaN: the logits stay finite and the row
    still samples (a temperature below 1e-5 is greedy, as in vLLM)."""
    logits = _logits()
    apply_penalties(logits, [SamplingParams(repetition_penalty=1e-45)], [[3]], [0])
    assert torch.isfinite(logits).all() and logits[0].argmax().item() == 3
    for params in (
        SamplingParams(repetition_penalty=1e-45, temperature=0.5, seed=1),
        SamplingParams(temperature=1e-30, seed=1),
        SamplingParams(temperature=1e-4, seed=1),
    ):
        ((token, _),) = _sample(_logits() * 1e4, [params], [[3]], [0])
        assert token == 3, params


def test_min_p_one_samples_only_the_likeliest() -> None:
    params = [SamplingParams(temperature=1.5, min_p=1.0, seed=s) for s in range(20)]
    picks = {t for t, _ in _sample(_logits(20), params)}
    assert picks == {3}
    free = {
        t
        for t, _ in _sample(
            _logits(20), [SamplingParams(temperature=1.5, seed=s) for s in range(20)]
        )
    }
    assert len(free) > 1


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_bad_values_name_their_field(fields: dict, name: str) -> None:
    with pytest.raises(ValidationError) as err:
        SamplingParams(**fields).validate()
    assert err.value.field == name


def test_logit_bias_outside_the_vocabulary_names_logit_bias() -> None:
    request = GenerateRequest("r", (1, 2), SamplingParams(logit_bias=((500, 1.0),)))
    with pytest.raises(ValidationError) as err:
        request.validate(vocab_size=128, max_model_len=256)
    assert err.value.field == "logit_bias" and "500" in str(err.value)
