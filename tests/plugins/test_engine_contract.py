"""The engine contract (`plugins/base.py`), once, against every engine that runs here.

One engine per kind and module: `torch` (ours, on the tiny random Llama, CPU) always; `vllm`
where vLLM imports (its CPU build, the default SmolLM2, eager); `trtllm` where tensorrt_llm
imports and a CUDA device exists (NGC's TensorRT-LLM image: `tests/ngc/run.sh`; the model
from `TRIDENT_TRTLLM_TEST_MODEL`, else the default SmolLM2 written as a Hugging Face
directory). An engine that cannot run here is skipped with the reason. The shutdown test is
each engine's last (pytest runs a module-scoped parameter's tests together, in file order).
"""

from __future__ import annotations

import importlib.util
import os
import queue
import time

import pytest

from kv_manager.events import BlockStored
from kv_manager.hashing import hash_blocks
from trident.core.errors import ContextLengthError, EngineError, ValidationError
from trident.core.types import EngineStats, GenerateRequest, SamplingParams, TokenChunk

PROMPT = tuple(
    range(3, 67)
)  # 64 tokens: whole blocks at block sizes 16 and 32, in every vocabulary here


def _torch(request):
    from plugins.torch_engine.config import TorchEngineConfig
    from plugins.torch_engine.engine import TorchEngine

    model = request.getfixturevalue("tiny_model_dir")
    return TorchEngine(
        TorchEngineConfig(
            model=model, dtype="float32", num_threads=1, num_blocks=64, worker_id="contract-torch"
        )
    )


def _vllm(request):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm does not import here (make setup-vllm)")
    from plugins.vllm.config import VllmEngineConfig
    from plugins.vllm.engine import VllmEngine
    from trident.core.endpoints import engine_events_endpoint

    directory = request.getfixturevalue("tmp_path_factory").mktemp("kv")
    return VllmEngine(
        VllmEngineConfig(
            dtype="float32",
            enforce_eager=True,
            kv_cache_mb=128,
            worker_id="contract-vllm",
            kv_events_endpoint=engine_events_endpoint("contract-vllm", directory),
        )
    )


def _trtllm(request):
    if importlib.util.find_spec("tensorrt_llm") is None:
        pytest.skip(
            "tensorrt_llm does not import here (NGC trtllm-python-py3 image only: tests/ngc/run.sh)"
        )
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT-LLM needs a CUDA device")
    from plugins.trtllm.config import TrtllmEngineConfig
    from plugins.trtllm.engine import TrtllmEngine

    model = os.environ.get("TRIDENT_TRTLLM_TEST_MODEL", "")
    return TrtllmEngine(
        TrtllmEngineConfig(
            model=model,
            worker_id="contract-trtllm",
            kv_cache_fraction=0.2,
            max_batch_size=8,
            max_num_tokens=2048,
            max_model_len=2048,
        )
    )


FACTORIES = {"torch": _torch, "vllm": _vllm, "trtllm": _trtllm}


@pytest.fixture(
    scope="module",
    params=[
        "torch",
        pytest.param("vllm", marks=pytest.mark.slow),
        pytest.param("trtllm", marks=pytest.mark.gpu),
    ],
)
def engine(request):
    e = FACTORIES[request.param](request)
    try:
        e.start()
    except BaseException:
        e.shutdown()
        raise
    yield e
    e.shutdown()


def _submit(engine, request: GenerateRequest) -> queue.Queue:
    chunks: queue.Queue[TokenChunk] = queue.Queue()
    engine.submit(request, chunks.put)
    return chunks


def _until_finished(chunks: queue.Queue, timeout: float = 120.0) -> list[TokenChunk]:
    out: list[TokenChunk] = []
    deadline = time.monotonic() + timeout
    while not (out and out[-1].finished):
        out.append(chunks.get(timeout=max(0.1, deadline - time.monotonic())))
    return out


def _nothing_more(chunks: queue.Queue, wait: float = 0.5) -> bool:
    time.sleep(wait)
    return chunks.empty()


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_submit_streams_then_finishes_once(engine) -> None:
    chunks = _submit(engine, GenerateRequest("c-stream", PROMPT, _greedy(6)))
    out = _until_finished(chunks)
    assert [c.finished for c in out].count(True) == 1 and out[-1].finished
    assert out[-1].finish_reason == "length" and out[-1].num_input_tokens == len(PROMPT)
    tokens = [t for c in out for t in c.output_ids]
    assert len(tokens) == 6 and all(0 <= t < engine.info().vocab_size for t in tokens)
    assert all(c.request_id == "c-stream" for c in out)
    assert _nothing_more(chunks)


def test_greedy_is_deterministic(engine) -> None:
    runs = [
        [
            t
            for c in _until_finished(
                _submit(engine, GenerateRequest(f"c-det{i}", PROMPT, _greedy(4)))
            )
            for t in c.output_ids
        ]
        for i in range(2)
    ]
    assert runs[0] == runs[1]


def test_abort_ends_with_one_abort_chunk(engine) -> None:
    chunks = _submit(engine, GenerateRequest("c-abort", PROMPT, _greedy(180)))
    first = chunks.get(timeout=120)
    engine.abort("c-abort")
    out = [first] + ([] if first.finished else _until_finished(chunks))
    assert out[-1].finish_reason == "abort" and [c.finished for c in out].count(True) == 1
    assert sum(len(c.output_ids) for c in out) < 180
    assert _nothing_more(chunks)
    engine.abort("c-abort")  # again, or for an unknown request: nothing happens
    engine.abort("never-submitted")
    assert _nothing_more(chunks, 0.2)


def test_bad_requests_raise_at_once_naming_the_field(engine) -> None:
    info = engine.info()
    cases = [
        (GenerateRequest("c-bad1", PROMPT, SamplingParams(max_tokens=0)), "max_tokens"),
        (GenerateRequest("c-bad2", (info.vocab_size,), _greedy(2)), "input_ids"),
        (GenerateRequest("c-bad3", (), _greedy(2)), "prompt"),
        (GenerateRequest("c-bad4", PROMPT, SamplingParams(temperature=-1.0)), "temperature"),
    ]
    for request, field in cases:
        sink: queue.Queue = queue.Queue()
        with pytest.raises(ValidationError) as err:
            engine.submit(request, sink.put)
        assert err.value.field == field and sink.empty()
    with pytest.raises(ContextLengthError):
        engine.submit(
            GenerateRequest("c-bad5", PROMPT, _greedy(info.max_model_len)), lambda chunk: None
        )


def test_stats_count_the_work_and_settle_when_idle(engine) -> None:
    before = engine.stats()
    assert isinstance(before, EngineStats)
    _until_finished(_submit(engine, GenerateRequest("c-stats", PROMPT, _greedy(3))))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = engine.stats()
        if (
            now.generated_tokens >= before.generated_tokens + 3
            and now.running == 0
            and now.waiting == 0
        ):
            break
        time.sleep(0.05)
    assert now.generated_tokens >= before.generated_tokens + 3, now
    assert now.running == 0 and now.waiting == 0 and now.total_blocks > 0, now


def test_kv_events_name_the_prompts_blocks(engine) -> None:
    info = engine.info()
    engine.take_events()
    prompt = tuple(
        3 + (7 * i) % 120 for i in range(2 * info.block_size)
    )  # not PROMPT: no cache hit
    _until_finished(_submit(engine, GenerateRequest("c-events", prompt, _greedy(2))))
    if info.kv_events is not None:  # vLLM: its own publisher carries them, take_events has none
        assert engine.take_events() == [] and info.kv_events.endpoint
        return
    stored: list[int] = []
    deadline = time.monotonic() + 10
    want = hash_blocks(list(prompt), info.block_size)
    while time.monotonic() < deadline and not set(want) <= set(stored):
        stored += [
            h for e in engine.take_events() if isinstance(e, BlockStored) for h in e.block_hashes
        ]
        time.sleep(0.05)
    assert set(want) <= set(stored), (want, stored)


def test_shutdown_aborts_what_runs_and_is_idempotent(engine) -> None:
    chunks = _submit(engine, GenerateRequest("c-shutdown", PROMPT, _greedy(180)))
    chunks.get(timeout=120)
    engine.shutdown()
    out = []
    while not chunks.empty():
        out.append(chunks.get())
    assert [c.finished for c in out].count(True) == 1 and out[-1].finish_reason == "abort"
    engine.shutdown()
    with pytest.raises(EngineError):
        engine.submit(GenerateRequest("c-late", PROMPT, _greedy(2)), lambda chunk: None)


@pytest.mark.parametrize("kind", ["torch", "vllm", "trtllm"])
def test_shutdown_of_an_engine_never_started(kind, request) -> None:
    e = FACTORIES[kind](request)
    e.shutdown()
    e.shutdown()
    with pytest.raises(EngineError):
        e.info()
