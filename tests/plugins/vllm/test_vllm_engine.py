"""The vLLM engine plugin (vLLM's CPU build, in this process) against the engine contract.

One engine per module (eager mode: starts in seconds). The default model, fp32 so that greedy
outputs can be compared token for token with transformers and our torch engine.
"""

from __future__ import annotations

import queue
import threading

import pytest

pytest.importorskip("vllm")

from plugins.vllm.config import VllmEngineConfig  # noqa: E402
from plugins.vllm.engine import VllmEngine  # noqa: E402
from trident.core.errors import (  # noqa: E402
    ConfigError,
    ContextLengthError,
    EngineError,
    ValidationError,
)
from trident.core.types import GenerateRequest, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    # shareable_kv: a prefill worker too; its staging pool holds 5 blocks of 32 tokens
    e = VllmEngine(VllmEngineConfig(dtype="float32", enforce_eager=True, kv_cache_mb=128, worker_id="vllm-test",
                                    shareable_kv=True, kv_staging_mb=8))
    e.start()
    yield e
    e.shutdown()


def _chat_ids(tok, question: str) -> tuple[int, ...]:
    return tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": question}])))


def _collect(engine, request, timeout=120):
    chunks = list(engine.generate(request, timeout=timeout))
    return chunks, [t for c in chunks for t in c.output_ids]


def test_info_describes_vllms_pool(engine) -> None:
    info = engine.info()
    assert info.block_size == 32 and info.num_blocks > 0
    assert info.vocab_size == 49152 and info.eos_token_ids == (2,)
    assert info.kv_layout.dtype == "float32" and info.kv_layout.num_layers == 30
    assert info.model_id == "SmolLM2-135M-Instruct.Q4_1"


def test_greedy_chat_answer_streams_in_chunks(engine, tok) -> None:
    chunks, ids = _collect(engine, GenerateRequest("paris", _chat_ids(tok, "What is the capital of France?"),
                                                   SamplingParams(max_tokens=24, temperature=0)))
    assert "Paris" in tok.decode(ids)
    assert len(chunks) > 2 and all(not c.finished for c in chunks[:-1])
    last = chunks[-1]
    assert last.finished and last.finish_reason == "stop" and last.num_input_tokens == 37


def test_repeated_prompt_is_a_prefix_cache_hit(engine, tok) -> None:
    ids = tuple(tok.encode("A shared prefix for the cache test. " * 12))
    _collect(engine, GenerateRequest("c1", ids, SamplingParams(max_tokens=2, temperature=0)))
    chunks, _ = _collect(engine, GenerateRequest("c2", ids, SamplingParams(max_tokens=2, temperature=0)))
    cached = chunks[-1].cached_tokens
    assert cached > 0 and cached % 32 == 0 and cached < len(ids)


def test_length_and_stop_tokens(engine, tok) -> None:
    ids = tuple(tok.encode("Count: one two three"))
    chunks, out = _collect(engine, GenerateRequest("len", ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    assert len(out) == 5 and chunks[-1].finish_reason == "length"
    first = out[0]
    chunks, out = _collect(engine, GenerateRequest("stop", ids, SamplingParams(max_tokens=5, temperature=0, stop_token_ids=(first,))))
    assert out == [] and chunks[-1].finish_reason == "stop"  # the stop token is not output


def test_seeded_sampling_repeats(engine, tok) -> None:
    ids = tuple(tok.encode("Once upon a time"))
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    assert _collect(engine, GenerateRequest("s1", ids, sp))[1] == _collect(engine, GenerateRequest("s2", ids, sp))[1]


def test_abort_frees_vllms_blocks(engine, tok) -> None:
    chunks: queue.Queue = queue.Queue()
    engine.submit(GenerateRequest("long", tuple(tok.encode("Tell me a long story. " * 8)),
                                  SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)), chunks.put)
    chunks.get(timeout=60)
    assert _wait(lambda: engine.stats().active_blocks > 0 and engine.stats().running == 1)
    engine.abort("long")
    while not (last := chunks.get(timeout=60)).finished:
        pass
    assert last.finish_reason == "abort"
    assert _wait(lambda: engine.stats().active_blocks == 0)
    scheduler = engine._llm.engine_core.engine_core.scheduler  # vLLM's own view of its pool
    assert scheduler.kv_cache_manager.usage == 0.0 and not scheduler.running
    stats = engine.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.active_prefill_tokens == 0
    engine.abort("long")  # unknown now: nothing happens


def test_bad_requests_are_refused_naming_the_field(engine) -> None:
    with pytest.raises(ValidationError, match="input_ids"):
        engine.submit(GenerateRequest("bad", (1, 10**6), SamplingParams()), lambda c: None)
    with pytest.raises(ContextLengthError):
        engine.submit(GenerateRequest("big", (1,) * 2000, SamplingParams(max_tokens=100)), lambda c: None)
    with pytest.raises(ValidationError, match="hold_kv: a prompt of 200 tokens needs 7 staging blocks.*kv_staging_mb"):
        engine.submit(GenerateRequest("pf", (1,) * 200, SamplingParams(max_tokens=1), hold_kv=True), lambda c: None)
    with pytest.raises(ValidationError, match="first_token"):
        engine.submit(GenerateRequest("dc0", (1, 2), SamplingParams(), kv_descriptor=b"x"), lambda c: None)
    with pytest.raises(ValidationError, match="kv_descriptor"):
        engine.submit(GenerateRequest("dc", (1, 2), SamplingParams(), kv_descriptor=b"x", first_token=3), lambda c: None)


def test_concurrent_requests_each_get_one_final_chunk(engine, tok) -> None:
    finals: dict[str, int] = {}
    done = threading.Semaphore(0)
    lock = threading.Lock()

    def sink(c):
        if c.finished:
            with lock:
                finals[c.request_id] = finals.get(c.request_id, 0) + 1
            done.release()

    for i in range(6):
        engine.submit(GenerateRequest(f"cc{i}", tuple(tok.encode(f"Item {i}:")), SamplingParams(max_tokens=4, temperature=0)), sink)
    for _ in range(6):
        assert done.acquire(timeout=60)
    assert finals == {f"cc{i}": 1 for i in range(6)}


def test_block_size_must_suit_vllms_cpu_attention() -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        VllmEngineConfig(block_size=16).validate()


def test_shutdown_is_idempotent_and_refuses_new_work() -> None:
    e = VllmEngine(VllmEngineConfig(enforce_eager=True, kv_cache_mb=64))
    e.shutdown()  # never started
    with pytest.raises(EngineError):
        e.info()


def _wait(predicate, timeout: float = 30.0) -> bool:
    from tests.waiting import wait_for

    return wait_for(predicate, timeout=timeout, interval=0.05)


QUESTIONS = ("What is the capital of France?", "Name three primary colors.", "What is 12 times 12?")


def test_fp32_greedy_equals_transformers_and_the_torch_engine(engine, tok) -> None:
    """fp32 greedy, up to the model's own end of turn: vLLM, transformers (on the directory vLLM
    loads) and our torch engine (on the GGUF it came from) pick the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from plugins.torch_engine.config import TorchEngineConfig
    from plugins.torch_engine.engine import TorchEngine
    from plugins.vllm.model_dir import hf_model_dir

    prompts = [_chat_ids(tok, q) for q in QUESTIONS]
    sp = SamplingParams(max_tokens=20, temperature=0)
    ours_vllm = [_collect(engine, GenerateRequest(f"g{i}", p, sp))[1] for i, p in enumerate(prompts)]
    torch_engine = TorchEngine(TorchEngineConfig(dtype="float32", kv_cache_mb=64, num_threads=1))
    torch_engine.start()
    try:
        ours_torch = [_collect(torch_engine, GenerateRequest(f"t{i}", p, sp))[1] for i, p in enumerate(prompts)]
    finally:
        torch_engine.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(hf_model_dir(""), dtype=torch.float32).eval()
    for p, v, t in zip(prompts, ours_vllm, ours_torch, strict=True):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=2)
        hf_ids = g[0, len(p):].tolist()
        assert hf_ids[-1] == 2  # transformers keeps the end-of-turn token; engines leave it out
        assert v == hf_ids[:-1] == t, tok.decode(v)


def test_logprobs_and_prompt_logprobs_equal_transformers(engine, tok) -> None:
    """vLLM's logprobs (raw log-softmax) as our TokenChunk fields: the sampled token's, the top
    k likeliest first, and the prompt's from its second token; transformers agrees (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from plugins.vllm.model_dir import hf_model_dir

    prompt = tuple(tok.encode("The capital of France is"))
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    chunks, out = _collect(engine, GenerateRequest("vlp", prompt, sp))
    lps = [x for c in chunks for x in c.logprobs]
    tops = [x for c in chunks for x in c.top_logprobs]
    plps = [x for c in chunks for x in c.prompt_logprobs]
    assert len(lps) == len(tops) == len(out) == 4 and len(plps) == len(prompt) - 1
    hf = AutoModelForCausalLM.from_pretrained(hf_model_dir(""), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([list(prompt) + out])).logits[0].float(), dim=-1)
    for i, token in enumerate(out):
        row = ref[len(prompt) - 1 + i]
        assert lps[i] == pytest.approx(row[token].item(), abs=2e-3)
        assert [t for t, _ in tops[i]] == torch.topk(row, 3).indices.tolist()
    for i, token in enumerate(prompt[1:]):
        assert plps[i] == pytest.approx(ref[i, token].item(), abs=2e-3)


def test_penalties_and_logit_bias_map_onto_vllm(engine, tok) -> None:
    prompt = tuple(tok.encode("Repeat after me: yes yes yes yes yes"))
    bias = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logit_bias=((42, 100.0),))
    assert _collect(engine, GenerateRequest("vbias", prompt, bias))[1] == [42] * 3
    plain = _collect(engine, GenerateRequest("vplain", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))[1]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    penalized = _collect(engine, GenerateRequest("vpen", prompt, sp))[1]
    assert penalized != plain and len(set(penalized)) == len(penalized)  # every repeat penalized away
    with pytest.raises(ValidationError) as err:
        engine.submit(GenerateRequest("vmoved", prompt, sp, output_offset=2), lambda c: None)
    assert err.value.field == "presence_penalty"
