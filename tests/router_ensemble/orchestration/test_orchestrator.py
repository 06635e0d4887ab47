"""The router's orchestration against the real engine and tokenizer, in-process (no Triton)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from router_ensemble.orchestration.local_client import EngineWorkerClient
from router_ensemble.orchestration.orchestrator import Orchestrator
from router_ensemble.routing.directory import RoundRobinSelector, WorkerDirectory
from router_ensemble.text.tokenizer import load_tokenizer
from trident.core.errors import ValidationError
from trident.core.router_io import RouterDelta, RouterRequest
from trident.core.types import SamplingParams


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    eng = TorchEngine(TorchEngineConfig(kv_cache_mb=32, num_threads=1, worker_id="decode"))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def orchestrator(engine: TorchEngine) -> Orchestrator:
    selector = RoundRobinSelector(WorkerDirectory("decode", fixed=("decode", "decode_1")))
    client = EngineWorkerClient({"decode": engine, "decode_1": engine})
    return Orchestrator(load_tokenizer(""), selector, client)


def run(orch: Orchestrator, request: RouterRequest, is_cancelled=lambda: False) -> list[RouterDelta]:
    out: list[RouterDelta] = []
    orch.run(request, out.append, is_cancelled)
    return out


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_chat_answers_paris_in_one_response(orchestrator: Orchestrator) -> None:
    messages = ({"role": "user", "content": "What is the capital of France?"},)
    out = run(orchestrator, RouterRequest(sampling=greedy(24), messages=messages))
    assert len(out) == 1 and out[0].final
    assert "Paris" in out[0].text_output
    assert out[0].num_output_tokens == len(out[0].output_ids)


def test_stream_equals_whole_and_round_robins(orchestrator: Orchestrator) -> None:
    sp = SamplingParams(max_tokens=20, temperature=0.8, seed=5)
    whole = run(orchestrator, RouterRequest(sampling=sp, text_input="Once upon a time"))
    deltas = run(orchestrator, RouterRequest(sampling=sp, text_input="Once upon a time", stream=True))
    assert len(deltas) > 1 and all(not d.final for d in deltas[:-1]) and deltas[-1].final
    assert "".join(d.text_output for d in deltas) == whole[0].text_output
    assert sum((list(d.output_ids) for d in deltas), []) == list(whole[0].output_ids)
    assert [d.num_output_tokens for d in deltas] == sorted(d.num_output_tokens for d in deltas)
    assert {whole[0].worker, deltas[-1].worker} == {"decode", "decode_1"}


def test_stop_string_finishes_with_stop(orchestrator: Orchestrator) -> None:
    base = RouterRequest(sampling=greedy(20, ignore_eos=True), text_input="Monday, Tuesday,")
    full = run(orchestrator, base)[0].text_output
    stop = full[5:9]
    for stream in (False, True):
        req = RouterRequest(sampling=base.sampling, text_input=base.text_input, stop=(stop,), stream=stream)
        out = run(orchestrator, req)
        assert "".join(d.text_output for d in out) == full[: full.index(stop)]
        assert out[-1].finish_reason == "stop"


def test_cancellation_aborts_and_frees_blocks(orchestrator: Orchestrator, engine: TorchEngine) -> None:
    polls = []

    def cancelled() -> bool:
        polls.append(time.monotonic())
        return len(polls) >= 2

    orchestrator.cancel_poll_s = 0.0
    try:
        req = RouterRequest(sampling=greedy(500, ignore_eos=True), text_input="Tell me a story", stream=True)
        out = run(orchestrator, req, cancelled)
    finally:
        orchestrator.cancel_poll_s = 0.1
    assert out[-1].finish_reason == "abort" and out[-1].num_output_tokens < 500
    deadline = time.monotonic() + 5
    while engine.stats().active_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats().active_blocks == 0 and engine.stats().running == 0


def test_concurrent_requests(orchestrator: Orchestrator) -> None:
    results: list[str] = []
    messages = ({"role": "user", "content": "What is the capital of France?"},)

    def one() -> None:
        results.append(run(orchestrator, RouterRequest(sampling=greedy(16), messages=messages))[-1].text_output)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and all("Paris" in r for r in results)


def test_errors_name_the_field(orchestrator: Orchestrator) -> None:
    with pytest.raises(ValidationError, match="^messages:"):
        run(orchestrator, RouterRequest(sampling=greedy(4), messages=({"role": "user", "content": [{"type": "image"}]},)))
    with pytest.raises(ValidationError, match="^prompt:"):
        run(orchestrator, RouterRequest(sampling=greedy(4), input_ids=(100,) * 9000))
    assert run(orchestrator, RouterRequest(sampling=greedy(3), text_input="Hi"))[-1].final
