"""The torch engine end to end on a tiny random Llama checkpoint (fp32, CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from trident.core.errors import ContextLengthError, ValidationError
from trident.core.types import GenerateRequest, SamplingParams

PROMPTS = [
    [5, 9, 13, 17, 21],
    list(range(3, 40)),
    [7] * 19,
    [60, 61, 62],
]


def _engine(model_dir: str, **kw) -> TorchEngine:
    cfg = TorchEngineConfig(model=model_dir, dtype="float32", block_size=4, num_threads=1, **{"num_blocks": 64, **kw})
    engine = TorchEngine(cfg)
    engine.start()
    return engine


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def _run(engine: TorchEngine, requests: list[GenerateRequest]) -> dict[str, list]:
    """Submit all at once (one batch) and collect every chunk per request."""
    out: dict[str, list] = {r.request_id: [] for r in requests}
    done = threading.Semaphore(0)

    def sink_for(rid: str):
        def sink(chunk):
            out[rid].append(chunk)
            if chunk.finished:
                done.release()

        return sink

    for r in requests:
        engine.submit(r, sink_for(r.request_id))
    for _ in requests:
        assert done.acquire(timeout=60)
    return out


def _tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.output_ids]


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    yield eng
    eng.shutdown()


def test_greedy_matches_transformers_alone_and_batched(engine, tiny_hf_model):
    expected = [_hf_greedy(tiny_hf_model, p, 12) for p in PROMPTS]
    for i, p in enumerate(PROMPTS):
        chunks = _run(engine, [GenerateRequest(f"solo{i}", tuple(p), _greedy(12))])[f"solo{i}"]
        assert _tokens(chunks) == expected[i]
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    batched = _run(engine, [GenerateRequest(f"b{i}", tuple(p), _greedy(12)) for i, p in enumerate(PROMPTS)])
    assert [_tokens(batched[f"b{i}"]) for i in range(len(PROMPTS))] == expected
    assert engine.stats().active_blocks == 0


def test_prefix_cache_hit_gives_same_output_and_reports_cached_tokens(engine):
    prompt = tuple(range(40, 70))
    first = _run(engine, [GenerateRequest("p1", prompt, _greedy(6))])["p1"]
    second = _run(engine, [GenerateRequest("p2", prompt, _greedy(6))])["p2"]
    assert _tokens(first) == _tokens(second)
    assert second[-1].cached_tokens == 28  # 7 full blocks of 4; the last token is recomputed
    assert second[-1].num_input_tokens == 30


def test_chunked_prefill_and_preemption_keep_outputs(tiny_model_dir, tiny_hf_model):
    # 12 blocks of 4 tokens cannot hold four 37+8 token sequences at once: preemption.
    eng = _engine(tiny_model_dir, num_blocks=16, max_num_batched_tokens=8)
    try:
        reqs = [GenerateRequest(f"r{i}", tuple(range(3 + i, 40 + i)), _greedy(8)) for i in range(4)]
        out = _run(eng, reqs)
        for r in reqs:
            assert _tokens(out[r.request_id]) == _hf_greedy(tiny_hf_model, list(r.input_ids), 8)
        assert eng.stats().preemptions > 0
        assert eng.stats().active_blocks == 0
    finally:
        eng.shutdown()


def test_abort_frees_every_block(engine):
    started = threading.Event()
    chunks = []

    def sink(c):
        chunks.append(c)
        started.set()

    engine.submit(GenerateRequest("long", tuple(range(3, 50)), _greedy(150)), sink)
    assert started.wait(30)
    engine.abort("long")
    deadline = threading.Event()
    for _ in range(100):
        if chunks and chunks[-1].finished:
            break
        deadline.wait(0.05)
    assert chunks[-1].finish_reason == "abort"
    for _ in range(40):  # stats are refreshed by the loop thread
        if engine.stats().active_blocks == 0:
            break
        deadline.wait(0.05)
    assert engine.stats().active_blocks == 0 and engine.stats().running == 0


def test_seeded_sampling_is_reproducible_across_batches(engine):
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    alone = _tokens(_run(engine, [GenerateRequest("s1", (5, 6, 7), sp)])["s1"])
    mixed = _run(
        engine,
        [GenerateRequest("s2", (5, 6, 7), sp)]
        + [GenerateRequest(f"n{i}", (9, 10 + i), SamplingParams(max_tokens=10, temperature=1.0)) for i in range(3)],
    )
    assert _tokens(mixed["s2"]) == alone


def test_stop_tokens_min_tokens_and_eos(engine, tiny_hf_model):
    prompt = [5, 9, 13, 17, 21]
    ref = _hf_greedy(tiny_hf_model, prompt, 12)
    stop = ref[3]
    out = _tokens(_run(engine, [GenerateRequest("st", tuple(prompt), _greedy(12, stop_token_ids=(stop,)))])["st"])
    assert out == ref[: ref.index(stop)]
    # min_tokens bans the stop id until enough tokens were produced.
    out = _run(engine, [GenerateRequest("mn", tuple(prompt), _greedy(12, stop_token_ids=(stop,), min_tokens=12))])["mn"]
    assert stop not in _tokens(out)[:12] and len(_tokens(out)) == 12


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sampling": SamplingParams(temperature=-1)}, "temperature"),
        ({"sampling": SamplingParams(top_p=0)}, "top_p"),
        ({"sampling": SamplingParams(max_tokens=0)}, "max_tokens"),
        ({"sampling": SamplingParams(max_tokens=2, min_tokens=3)}, "min_tokens"),
        ({"input_ids": ()}, "prompt"),
        ({"input_ids": (1, 999)}, "input_ids"),
    ],
)
def test_invalid_requests_name_the_field(engine, kwargs, field):
    req = GenerateRequest("bad", **{"input_ids": (1, 2), **kwargs})
    with pytest.raises(ValidationError) as err:
        engine.submit(req, lambda c: None)
    assert err.value.field == field


def test_context_length_is_enforced(engine):
    with pytest.raises(ContextLengthError, match="context length"):
        engine.submit(GenerateRequest("big", (1,) * 250, SamplingParams(max_tokens=10)), lambda c: None)


def test_shutdown_aborts_pending_and_is_idempotent(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    got = []
    eng.submit(GenerateRequest("x", tuple(range(3, 30)), _greedy(200)), got.append)
    eng.shutdown()
    eng.shutdown()
    assert got and got[-1].finished and got[-1].finish_reason == "abort"
    half = TorchEngine(TorchEngineConfig(model=tiny_model_dir))
    half.shutdown()  # never started
