"""The torch engine over KV tiers, on the real default model (SmolLM2-135M, fp32): a prompt
whose blocks were evicted from a small device pool comes back from host memory, or from disk
after a restart, and greedy output equals computing it, token for token."""

from __future__ import annotations

import threading

import pytest

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from router_ensemble.text.tokenizer import load_tokenizer
from trident.core.model_files import default_model_path
from trident.core.types import GenerateRequest, SamplingParams, TierStats

NEW_TOKENS = 16
HISTORY = (
    "User: Tell me about the tides. Assistant: Tides are the regular rise and fall of the "
    "sea, caused by the gravity of the Moon and the Sun acting on the rotating Earth. "
) * 4
OTHER = "A completely different conversation about baking sourdough bread at home. " * 16


@pytest.fixture(scope="module")
def texts():
    tok = load_tokenizer(default_model_path())
    history = tok.encode(HISTORY)
    return history, history + tok.encode(" User: And in a lake?"), tok.encode(OTHER)


def _engine(**kw) -> TorchEngine:
    # 16 blocks of 16 tokens: the history (~9 blocks) and the other prompt (~10) do not fit together.
    cfg = TorchEngineConfig(dtype="float32", num_blocks=16, num_threads=2, max_num_batched_tokens=256, **kw)
    engine = TorchEngine(cfg)
    engine.start()
    return engine


def _generate(engine: TorchEngine, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    """Greedy output and the prompt tokens served from a cache."""
    chunks, done = [], threading.Event()

    def sink(chunk):
        chunks.append(chunk)
        if chunk.finished:
            done.set()

    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    engine.submit(GenerateRequest(rid, tuple(prompt), sp), sink)
    assert done.wait(120), f"{rid} did not finish"
    assert chunks[-1].error is None, chunks[-1].error
    return [t for c in chunks for t in c.output_ids], chunks[-1].cached_tokens


def _tier(engine: TorchEngine, medium: str) -> TierStats:
    return next(t for t in engine.stats().tiers if t.medium == medium)


@pytest.fixture(scope="module")
def expected(texts):
    engine = _engine(enable_prefix_caching=False)
    try:
        return _generate(engine, "ref", texts[1])[0]
    finally:
        engine.shutdown()


def test_prefix_onboarded_from_host_equals_computing_it(texts, expected):
    history, turn, other = texts
    engine = _engine(kv_host_mb=64)
    try:
        _generate(engine, "t1", history)
        _generate(engine, "other", other)  # evicts the history from the device pool
        tokens, cached = _generate(engine, "t2", turn)
        host = _tier(engine, "CPU")
        assert tokens == expected
        # The pool evicts a prompt's tail first: the leading blocks hit in the device pool,
        # the evicted rest comes from host memory, and nothing of the history is recomputed.
        assert host.onboarded >= 3, host
        assert cached == len(history) // 16 * 16
        assert host.bytes_onboarded == host.onboarded * engine.info().kv_layout.block_nbytes
        assert engine.stats().active_blocks == 0
    finally:
        engine.shutdown()


def test_prefix_onboarded_from_disk_after_restart_equals_computing_it(texts, expected, tmp_path):
    history, turn, _ = texts
    kw = {"kv_disk_gb": 0.5, "kv_disk_dir": str(tmp_path), "kv_disk_admit_after": 1, "worker_id": "w0"}
    first = _engine(**kw)
    try:
        _generate(first, "t1", history)
        _wait_idle(first)
        # The prompt's full blocks and the one its output completed.
        assert _tier(first, "DISK").held_blocks == (len(history) + NEW_TOKENS) // 16
    finally:
        first.shutdown()
    second = _engine(**kw)  # a restart: same directory, empty device pool
    try:
        assert _tier(second, "DISK").held_blocks == (len(history) + NEW_TOKENS) // 16
        tokens, cached = _generate(second, "t2", turn)
        disk = _tier(second, "DISK")
        assert tokens == expected
        assert disk.onboarded == len(history) // 16 and cached >= disk.onboarded * 16
    finally:
        second.shutdown()


def _wait_idle(engine: TorchEngine, timeout: float = 30.0) -> None:
    """Until the background stores are done (their block references are dropped)."""
    import time

    deadline = time.monotonic() + timeout
    while engine.stats().active_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats().active_blocks == 0
