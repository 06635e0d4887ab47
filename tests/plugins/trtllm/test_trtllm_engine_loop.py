"""`TrtllmEngine`'s own machinery (its asyncio loop thread, streaming, abort, shutdown, events,
stats, the disaggregated handoff between two engines) over a stand-in for TensorRT-LLM's `LLM`.

TensorRT-LLM cannot be installed here, so these tests replace the one seam the engine has onto
it (`plugins.trtllm.setup.build_llm` and `setup.api`) with `StandInLLM`, written from the
documented LLM API of TensorRT-LLM 1.1.0 (`tensorrt_llm/llmapi/llm.py`: `generate_async(inputs,
sampling_params, streaming, disaggregated_params)` returning a `RequestOutput` that is
async-iterable and has `abort()`; `get_kv_cache_events_async` / `get_stats_async(timeout)`;
`shutdown()`; the output, event and stats formats as in the other tests of this folder). What
this checks is Trident's side; what TensorRT-LLM itself does is checked by the contract suite
in the NGC image only (tests/ngc/run.sh).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from kv_manager.events import BlockStored
from kv_manager.hashing import hash_blocks
from kv_manager.layout import KVLayout
from plugins.base import EngineInfo
from plugins.trtllm import setup
from plugins.trtllm.config import TrtllmEngineConfig
from plugins.trtllm.engine import TrtllmEngine
from trident.core.errors import EngineError, ValidationError
from trident.core.types import GenerateRequest, SamplingParams

BS = 32
VOCAB = 1000
LAYOUT = KVLayout(4, 2, 16, BS, "bfloat16", "standin")
PROMPT = tuple(range(10, 80))  # 70 tokens: two full blocks


@dataclass
class DisaggregatedParams:  # tensorrt_llm/disaggregated_params.py
    request_type: str | None = None
    first_gen_tokens: list | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list | None = None


@dataclass
class CompletionOutput:
    index: int = 0
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    logprobs: list = field(default_factory=list)
    disaggregated_params: Any = None


def next_token(prompt, i: int) -> int:
    return (sum(prompt) * 31 + i * 7) % (VOCAB - 10) + 10  # never an EOS (2)


class StandInResult:
    """A streaming `RequestOutput`: the same object, updated once per step."""

    ids = itertools.count(1)

    def __init__(self, llm, prompt, params, disagg) -> None:
        self.llm, self.prompt, self.params, self.disagg = llm, list(prompt), params, disagg
        self.outputs = [CompletionOutput()]
        self.finished = False
        self.cached_tokens = 0
        self.aborted = False
        self.request_id = next(self.ids)

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self):
        return self._steps()

    async def _steps(self):
        out = self.outputs[0]
        kind = self.disagg.request_type if self.disagg is not None else None
        if kind == "generation_only":
            self.llm.generation_params.append(self.disagg)
            out.token_ids.append(self.disagg.first_gen_tokens[0])
        else:
            self.llm.store(self.prompt)
        n = 1 if kind == "context_only" else self.params.max_tokens
        while len(out.token_ids) < n:
            await asyncio.sleep(self.llm.step_s)
            if self.aborted:
                out.finish_reason, self.finished = "cancelled", True
                yield self
                return
            out.token_ids.append(next_token(self.prompt, len(out.token_ids)))
            self.llm.stats.append(
                {
                    "iter": len(out.token_ids),
                    "numActiveRequests": 1,
                    "kvCacheStats": {"maxNumBlocks": 100, "usedNumBlocks": 3},
                }
            )
            if len(out.token_ids) == n:
                out.finish_reason, self.finished = "length", True
                if kind == "context_only":
                    out.disaggregated_params = DisaggregatedParams(
                        "context_only",
                        list(out.token_ids),
                        self.request_id,
                        b"opaque-%d" % self.request_id,
                    )
            yield self


class StandInLLM:
    def __init__(self, step_s: float = 0.005) -> None:
        self.step_s = step_s
        self.events: deque = deque(
            [
                {
                    "event_id": 0,
                    "window_size": 4096,
                    "data": {"type": "created", "num_blocks_per_cache_level": [100, 0]},
                }
            ]
        )
        self.stats: deque = deque()
        self.generation_params: list = []
        self.results: list = []
        self.shutdowns = 0
        self.fail = False
        self._event_id = itertools.count(1)

    def generate_async(
        self, inputs, sampling_params=None, streaming=False, disaggregated_params=None
    ):
        assert streaming and isinstance(inputs, list)
        if self.fail:
            raise RuntimeError("the stand-in refuses")
        result = StandInResult(self, inputs, sampling_params, disaggregated_params)
        self.results.append(result)
        return result

    def store(self, prompt) -> None:
        blocks = [
            {
                "type": "stored_block",
                "block_hash": hash(tuple(prompt[: i + BS])) & 0xFFFF_FFFF,
                "tokens": [
                    {"type": "unique_token", "token_id": t, "token_extra_id": 0}
                    for t in prompt[i : i + BS]
                ],
                "cache_level": 0,
                "priority": 35,
            }
            for i in range(0, len(prompt) - BS + 1, BS)
        ]
        self.events.append(
            {
                "event_id": next(self._event_id),
                "window_size": 4096,
                "data": {"type": "stored", "parent_hash": None, "blocks": blocks},
            }
        )

    async def _drain(self, items: deque):
        while items:
            yield items.popleft()

    def get_kv_cache_events_async(self, timeout=2):
        return self._drain(self.events)

    def get_stats_async(self, timeout=2):
        return self._drain(self.stats)

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def standin(monkeypatch):
    built: list[StandInLLM] = []

    def build_llm(config):
        llm = StandInLLM()
        built.append(llm)
        info = EngineInfo("standin", BS, 0, 2048, VOCAB, (2,), LAYOUT, config.device)
        return llm, info

    api = SimpleNamespace(
        SamplingParams=lambda **kw: SimpleNamespace(**kw),
        DisaggregatedParams=DisaggregatedParams,
        GuidedDecodingParams=lambda **kw: SimpleNamespace(**kw),
    )
    api.sampling_params = lambda kwargs, vocab_size: setup.sampling_params(api, kwargs, vocab_size)
    monkeypatch.setattr(setup, "build_llm", build_llm)
    monkeypatch.setattr(setup, "api", lambda: api)
    return built


def _engine(**kw) -> TrtllmEngine:
    engine = TrtllmEngine(TrtllmEngineConfig(stats_interval_s=0.01, **kw))
    engine.start()
    return engine


def _collect(engine, request, timeout=10.0):
    chunks: queue.Queue = queue.Queue()
    engine.submit(request, chunks.put)
    out = []
    while not (out and out[-1].finished):
        out.append(chunks.get(timeout=timeout))
    time.sleep(0.05)
    assert chunks.empty(), "a chunk after the finished one"
    return out


def _eventually(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_streams_stats_and_events(standin) -> None:
    engine = _engine(worker_id="loop1")
    try:
        out = _collect(
            engine, GenerateRequest("a", PROMPT, SamplingParams(max_tokens=5, temperature=0))
        )
        tokens = [t for c in out for t in c.output_ids]
        assert (
            tokens == [next_token(PROMPT, i) for i in range(5)]
            and out[-1].finish_reason == "length"
        )
        params = standin[0].results[0].params
        assert params.top_k == 1 and params.max_tokens == 5 and params.end_id == 2
        biased = SamplingParams(
            max_tokens=2, logit_bias=((7, 5.0),), structured_outputs='{"regex": "a+"}'
        )
        _collect(engine, GenerateRequest("a2", PROMPT, biased))
        params = standin[0].results[1].params
        assert params.embedding_bias.shape == (VOCAB,) and params.embedding_bias[7] == 5.0
        assert params.embedding_bias.sum() == 5.0 and params.guided_decoding.regex == "a+"
        assert _eventually(
            lambda: engine.stats().generated_tokens == 7 and engine.stats().running == 0
        )
        assert (
            engine.stats().total_blocks == 100 and engine.info().num_blocks == 100
        )  # its "created" event
        want = hash_blocks(list(PROMPT), BS)
        stored = []
        assert _eventually(
            lambda: stored.extend(e for e in engine.take_events() if isinstance(e, BlockStored))
            or [h for e in stored for h in e.block_hashes] == want * 2  # stored by both requests
        )
    finally:
        engine.shutdown()


def test_abort_and_failures_end_with_one_final_chunk(standin) -> None:
    engine = _engine(worker_id="loop2")
    try:
        chunks: queue.Queue = queue.Queue()
        engine.submit(
            GenerateRequest("b", PROMPT, SamplingParams(max_tokens=500, ignore_eos=True)),
            chunks.put,
        )
        chunks.get(timeout=10)
        engine.abort("b")
        out = []
        while not (out and out[-1].finished):
            out.append(chunks.get(timeout=10))
        assert out[-1].finish_reason == "abort" and _eventually(
            lambda: standin[0].results[0].aborted
        )
        time.sleep(0.1)
        assert chunks.empty()
        standin[0].fail = True
        (chunk,) = _collect(engine, GenerateRequest("c", PROMPT, SamplingParams(max_tokens=3)))
        assert chunk.finish_reason == "error" and "refuses" in chunk.error
        with pytest.raises(ValidationError) as err:
            engine.submit(
                GenerateRequest("d", PROMPT, SamplingParams(prompt_logprobs=1)), lambda c: None
            )
        assert err.value.field == "prompt_logprobs"
        with pytest.raises(ValidationError) as err:
            engine.submit(GenerateRequest("e", PROMPT, hold_kv=True), lambda c: None)
        assert err.value.field == "hold_kv"
    finally:
        engine.shutdown()


def test_shutdown_aborts_in_flight_requests_and_is_idempotent(standin) -> None:
    engine = _engine(worker_id="loop3")
    chunks: queue.Queue = queue.Queue()
    engine.submit(
        GenerateRequest("f", PROMPT, SamplingParams(max_tokens=500, ignore_eos=True)), chunks.put
    )
    chunks.get(timeout=10)
    engine.shutdown()
    out = []
    while not chunks.empty():
        out.append(chunks.get())
    assert [c.finished for c in out] == [True] and out[-1].finish_reason == "abort"
    engine.shutdown()
    assert standin[0].shutdowns == 1
    with pytest.raises(EngineError):
        engine.submit(GenerateRequest("g", PROMPT, SamplingParams(max_tokens=2)), lambda c: None)


def test_prefill_to_decode_through_the_descriptor(standin) -> None:
    prefill = _engine(worker_id="tp", cache_transceiver="DEFAULT", shareable_kv=True)
    decode = _engine(worker_id="td", cache_transceiver="DEFAULT")
    try:
        sampling = SamplingParams(max_tokens=6, temperature=0)
        (first,) = _collect(
            prefill, GenerateRequest("h", PROMPT, SamplingParams(max_tokens=1), hold_kv=True)
        )
        assert first.output_ids == (next_token(PROMPT, 0),) and first.kv_descriptor
        assert prefill.stats().leases == 1 or _eventually(lambda: prefill.stats().leases == 1)
        request = GenerateRequest(
            "h",
            PROMPT,
            sampling,
            kv_descriptor=first.kv_descriptor,
            first_token=first.output_ids[0],
        )
        out = _collect(decode, request)
        # the first token is not sent again; max_tokens counts it
        assert [t for c in out for t in c.output_ids] == [
            next_token(PROMPT, i) for i in range(1, 6)
        ]
        (params,) = standin[1].generation_params
        assert params.request_type == "generation_only" and params.first_gen_tokens == [
            first.output_ids[0]
        ]
        assert params.ctx_request_id == standin[0].results[0].request_id
        assert params.opaque_state == b"opaque-%d" % params.ctx_request_id
        assert _eventually(lambda: prefill.stats().leases == 0 and prefill.stats().held_blocks == 0)
        with pytest.raises(ValidationError) as err:  # a decode worker is not a prefill worker
            decode.submit(GenerateRequest("i", PROMPT, hold_kv=True), lambda c: None)
        assert err.value.field == "hold_kv"
    finally:
        prefill.shutdown()
        decode.shutdown()
