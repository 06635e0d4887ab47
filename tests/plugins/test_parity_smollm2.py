"""Greedy parity with Hugging Face transformers on the real default model (SmolLM2-135M
GGUF, fp32): one request at a time, all batched together, and on a prefix-cache hit."""

from __future__ import annotations

import os

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from router_ensemble.text.tokenizer import load_tokenizer
from trident.core.model_files import default_model_path
from trident.core.types import GenerateRequest, SamplingParams

NEW_TOKENS = 32
SYSTEM = "You are a concise assistant. Answer in one sentence and never use lists. " * 3
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Translate to French: I like apples.",
    "1, 2, 3, 4, 5,",
    "Explain in one sentence why the sky is blue. " * 4,
    SYSTEM + "Question: what is the boiling point of water at sea level?",
]


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer(default_model_path())
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(prompts):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32
    ).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            )
            out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def engine():
    eng = TorchEngine(TorchEngineConfig(dtype="float32", kv_cache_mb=64, max_model_len=2048))
    eng.start()
    yield eng
    eng.shutdown()


def _greedy() -> SamplingParams:
    # min_tokens bans EOS, as transformers' min_new_tokens does.
    return SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0)


def _collect(engine, reqs):
    import threading

    out = {r.request_id: [] for r in reqs}
    done = threading.Semaphore(0)
    for r in reqs:
        def sink(c, rid=r.request_id):
            out[rid].append(c)
            if c.finished:
                done.release()
        engine.submit(r, sink)
    for _ in reqs:
        assert done.acquire(timeout=300)
    return {rid: [t for c in cs for t in c.output_ids] for rid, cs in out.items()}, out


def test_one_at_a_time(engine, prompts, reference):
    for i, p in enumerate(prompts):
        got, _ = _collect(engine, [GenerateRequest(f"one{i}", tuple(p), _greedy())])
        assert got[f"one{i}"] == reference[i], f"prompt {i}: {TEXTS[i]!r}"


def test_all_batched(engine, prompts, reference):
    reqs = [GenerateRequest(f"batch{i}", tuple(p), _greedy()) for i, p in enumerate(prompts)]
    got, _ = _collect(engine, reqs)
    assert [got[f"batch{i}"] for i in range(len(prompts))] == reference


def test_prefix_cache_hit(engine, prompts, reference):
    i = len(prompts) - 1  # long shared system prompt
    _collect(engine, [GenerateRequest("warm", tuple(prompts[i]), _greedy())])
    got, chunks = _collect(engine, [GenerateRequest("hit", tuple(prompts[i]), _greedy())])
    assert chunks["hit"][-1].cached_tokens >= 16
    assert got["hit"] == reference[i]
