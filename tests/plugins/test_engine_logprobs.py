"""Logprobs, prompt logprobs and penalties through the torch engine on a tiny random Llama
(fp32, CPU), against transformers' log-softmax of the same model."""

from __future__ import annotations

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from trident.core.errors import ValidationError
from trident.core.types import GenerateRequest, SamplingParams

PROMPT = (5, 9, 13, 17, 21, 30, 31, 40, 41)
TOLERANCE = 1e-4  # fp32 on both sides; different kernels (paged attention vs eager)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    cfg = TorchEngineConfig(
        model=tiny_model_dir,
        dtype="float32",
        block_size=4,
        num_blocks=64,
        num_threads=1,
        max_num_batched_tokens=4,
    )
    eng = TorchEngine(cfg)
    eng.start()
    yield eng
    eng.shutdown()


def _chunks(engine: TorchEngine, request: GenerateRequest) -> list:
    return list(engine.generate(request, timeout=60))


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_output_logprobs_are_transformers_log_softmax(engine, tiny_hf_model):
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=5)
    chunks = _chunks(engine, GenerateRequest("lp", PROMPT, sp))
    out = [t for c in chunks for t in c.output_ids]
    lps = [x for c in chunks for x in c.logprobs]
    tops = [x for c in chunks for x in c.top_logprobs]
    assert len(lps) == len(tops) == len(out) == 6
    ref = _hf_logprobs(tiny_hf_model, list(PROMPT) + out)
    for i, token in enumerate(out):
        row = ref[len(PROMPT) - 1 + i]
        assert lps[i] == pytest.approx(row[token].item(), abs=TOLERANCE)
        values, ids = torch.topk(row, 5)
        assert [t for t, _ in tops[i]] == ids.tolist()
        assert [v for _, v in tops[i]] == pytest.approx(values.tolist(), abs=TOLERANCE)
    assert not any(c.prompt_logprobs for c in chunks)


def test_prompt_logprobs_over_chunked_prefill_skip_the_prefix_cache(engine, tiny_hf_model):
    # max_num_batched_tokens=4: the prompt is prefilled in three steps
    _chunks(engine, GenerateRequest("warm", PROMPT, SamplingParams(max_tokens=1, temperature=0)))
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=2)
    chunks = _chunks(engine, GenerateRequest("plp", PROMPT, sp))
    first = chunks[0]
    assert len(first.prompt_logprobs) == len(PROMPT) - 1 == len(first.prompt_top_logprobs)
    assert sum(len(c.prompt_logprobs) for c in chunks) == len(PROMPT) - 1  # sent once
    assert chunks[-1].cached_tokens == 0  # computed in full, as in vLLM
    ref = _hf_logprobs(tiny_hf_model, list(PROMPT))
    for i, token in enumerate(PROMPT[1:]):
        assert first.prompt_logprobs[i] == pytest.approx(ref[i, token].item(), abs=TOLERANCE)
        assert [t for t, _ in first.prompt_top_logprobs[i]] == torch.topk(
            ref[i], 2
        ).indices.tolist()


def test_logit_bias_forces_a_token(engine):
    sp = SamplingParams(
        max_tokens=4, temperature=0.7, seed=1, ignore_eos=True, logit_bias=((77, 100.0),)
    )
    assert [
        t for c in _chunks(engine, GenerateRequest("bias", PROMPT, sp)) for t in c.output_ids
    ] == [77] * 4


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(ValidationError) as err:
        engine.submit(
            GenerateRequest("bad", PROMPT, SamplingParams(logit_bias=((128, 1.0),))), lambda c: None
        )
    assert err.value.field == "logit_bias"


@pytest.mark.parametrize(
    "penalties",
    [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8}],
)
def test_penalties_see_earlier_outputs_of_a_migrated_request(engine, penalties):
    """A request resumed after k outputs (output_offset = k) continues exactly as the
    undisturbed run: the penalties count the outputs generated before the move."""
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **penalties)
    full = [t for c in _chunks(engine, GenerateRequest("whole", PROMPT, sp)) for t in c.output_ids]
    plain = [
        t
        for c in _chunks(
            engine,
            GenerateRequest(
                "plain", PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
            ),
        )
        for t in c.output_ids
    ]
    assert full != plain  # the penalty changed the greedy output
    k = 4
    resumed = GenerateRequest(
        "moved",
        PROMPT + tuple(full[:k]),
        SamplingParams(max_tokens=10 - k, temperature=0, ignore_eos=True, **penalties),
        output_offset=k,
    )
    assert [t for c in _chunks(engine, resumed) for t in c.output_ids] == full[k:]
