"""TensorRT-LLM's streamed RequestOutputs -> Trident TokenChunks (plugins.trtllm.outputs).

TensorRT-LLM cannot run here, so its outputs are written as plain objects with the documented
attributes of `tensorrt_llm/executor/result.py` (TensorRT-LLM 1.1.0): `RequestOutput.outputs[0]`
a `CompletionOutput` whose `token_ids` grow with each streamed output, `finish_reason` in
'stop' | 'length' | 'timeout' | 'cancelled', `stop_reason` (the stop word or None for the end
id), `logprobs` (one {token id: Logprob(logprob, rank)} per token), `disaggregated_params`;
`RequestOutput.finished`, `RequestOutput.cached_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plugins.trtllm.outputs import OutputTracker


@dataclass
class Logprob:  # tensorrt_llm.executor.result.Logprob
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    logprobs: list = field(default_factory=list)
    disaggregated_params: Any = None


@dataclass
class RequestOutput:
    outputs: list
    finished: bool = False
    cached_tokens: int = 0


def _stream(steps, finish=None, stop_reason=None, **kw):
    """The same RequestOutput object mutated step by step, as TensorRT-LLM streams it."""
    completion = CompletionOutput(**kw)
    result = RequestOutput([completion])
    for i, tokens in enumerate(steps):
        completion.token_ids = list(tokens)
        if i == len(steps) - 1 and finish is not None:
            completion.finish_reason, completion.stop_reason, result.finished = (
                finish,
                stop_reason,
                True,
            )
        yield result


def _chunks(tracker, results):
    return [c for c in (tracker.update(r) for r in results) if c is not None]


def test_deltas_then_one_final_chunk() -> None:
    t = OutputTracker("r", 5, (2,))
    chunks = _chunks(t, _stream([[7], [7], [7, 8, 9], [7, 8, 9, 10]], finish="length"))
    assert [c.output_ids for c in chunks] == [(7,), (8, 9), (10,)]
    assert [c.finished for c in chunks] == [False, False, True]
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_input_tokens == 5
    assert (
        t.update(RequestOutput([CompletionOutput(token_ids=[7, 8, 9, 10, 11])], finished=True))
        is None
    )


def test_the_end_id_is_not_output_but_an_ignored_eos_is() -> None:
    chunks = _chunks(OutputTracker("r", 3, (2,)), _stream([[7], [7, 2]], finish="stop"))
    assert [c.output_ids for c in chunks] == [(7,), ()] and chunks[-1].finish_reason == "stop"
    chunks = _chunks(
        OutputTracker("r", 3, (2,), ignore_eos=True), _stream([[7], [7, 2]], finish="length")
    )
    assert chunks[-1].output_ids == (2,)
    # a stop word: TensorRT-LLM already removed it from token_ids and names it in stop_reason
    chunks = _chunks(OutputTracker("r", 3, (2,)), _stream([[7], [7]], finish="stop", stop_reason=9))
    assert [(c.output_ids, c.finish_reason) for c in chunks] == [((7,), None), ((), "stop")]


def test_finish_reasons_and_cached_tokens() -> None:
    for raw, ours in (
        ("cancelled", "abort"),
        ("timeout", "error"),
        ("length", "length"),
        (None, "stop"),
    ):
        result = RequestOutput([CompletionOutput(token_ids=[1], finish_reason=raw)], finished=True)
        chunk = OutputTracker("r", 4, ()).update(result)
        assert (
            chunk.finished
            and chunk.finish_reason == ours
            and (chunk.error is not None) == (ours == "error")
        )
    result = RequestOutput(
        [CompletionOutput(token_ids=[1], finish_reason="length")], finished=True, cached_tokens=64
    )
    assert (
        OutputTracker("r", 40, ()).update(result).cached_tokens == 40
    )  # never more than the prompt


def test_a_generation_only_request_does_not_send_the_first_token_again() -> None:
    t = OutputTracker("r", 6, (2,), first_token=42)
    chunks = _chunks(t, _stream([[42], [42, 5], [42, 5, 6]], finish="length"))
    assert [c.output_ids for c in chunks] == [(5,), (6,)] and t.sent == 3


def test_logprobs_of_each_sent_token_and_its_alternatives() -> None:
    lp = [
        {7: Logprob(-0.1, 1), 3: Logprob(-2.5, 2)},
        {8: Logprob(-0.7, 2), 4: Logprob(-0.6, 1), 5: Logprob(-3.0, 3)},
    ]
    t = OutputTracker("r", 2, (), logprobs=1)
    chunks = _chunks(t, _stream([[7], [7, 8]], finish="length", logprobs=lp))
    assert [c.logprobs for c in chunks] == [(-0.1,), (-0.7,)]
    assert [c.top_logprobs for c in chunks] == [(((7, -0.1),),), (((4, -0.6),),)]
    assert (
        OutputTracker("r", 2, ()).update(next(_stream([[7]], logprobs=lp))).logprobs == ()
    )  # not asked for


def test_the_context_only_result_keeps_its_disaggregated_params() -> None:
    params = {"request_type": "context_only", "ctx_request_id": 17, "first_gen_tokens": [9]}
    t = OutputTracker("r", 8, (2,))
    (chunk,) = _chunks(t, _stream([[9]], finish="length", disaggregated_params=params))
    assert (
        chunk.output_ids == (9,)
        and chunk.finish_reason == "length"
        and t.disaggregated_params is params
    )


def test_abort_chunk_is_final() -> None:
    t = OutputTracker("r", 3, ())
    chunk = t.abort_chunk()
    assert chunk.finished and chunk.finish_reason == "abort" and t.finished
    assert OutputTracker("r", 3, ()).abort_chunk("boom").finish_reason == "error"
