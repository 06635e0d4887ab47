"""KV handoff through our vLLM connector (`plugins.vllm.connector`), engine to engine in this
process: the torch engine and vLLM share Trident's KV layout when their block size and dtype
match, so a prompt prefilled by one is decoded by the other, token for token as the decoding
engine alone would; with another block size the descriptor is refused, naming the layouts.
vLLM to vLLM runs through the real tritonserver (tests/integration/test_vllm_serving.py):
two vLLM engines cannot share one process (vLLM keeps one connector per process).
"""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("vllm")

from plugins.torch_engine.config import TorchEngineConfig  # noqa: E402
from plugins.torch_engine.engine import TorchEngine  # noqa: E402
from plugins.vllm.config import VllmEngineConfig  # noqa: E402
from plugins.vllm.engine import VllmEngine  # noqa: E402
from tests.waiting import wait_for  # noqa: E402
from trident.core.errors import ValidationError  # noqa: E402
from trident.core.types import GenerateRequest, SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def vllm_engine():
    e = VllmEngine(VllmEngineConfig(dtype="float32", enforce_eager=True, kv_cache_mb=128, worker_id="vllm-handoff",
                                    shareable_kv=True, lease_ttl_s=20))
    e.start()
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def torch32():
    """The torch engine with vLLM's block size: its pool's layout is the vLLM worker's."""
    e = TorchEngine(TorchEngineConfig(dtype="float32", block_size=32, kv_cache_mb=64, num_threads=1,
                                      shareable_kv=True, worker_id="torch-handoff"))
    e.start()
    yield e
    e.shutdown()


def _prompt(tok, question: str) -> tuple[int, ...]:
    """A chat prompt no engine has seen (a fresh session line): no prefix-cache hit anywhere."""
    messages = [{"role": "system", "content": f"Session {uuid.uuid4().hex}."}, {"role": "user", "content": question}]
    return tuple(tok.encode(tok.apply_chat_template(messages)))


def _run(engine, request) -> list[int]:
    return [t for c in engine.generate(request, timeout=120) for t in c.output_ids]


def _handoff(prefill, decode, ids, decode_ids=None) -> tuple[list[int], object]:
    """Prefill `ids` on one engine (hold_kv), decode on the other: the whole output, last chunk."""
    rid = uuid.uuid4().hex[:8]
    chunks = list(prefill.generate(GenerateRequest(f"p-{rid}", ids, SamplingParams(max_tokens=1, temperature=0.0),
                                                   hold_kv=True), timeout=120))
    first, descriptor = chunks[-1].output_ids[0], chunks[-1].kv_descriptor
    assert descriptor, "the prefill engine returned no descriptor"
    rest = list(decode.generate(GenerateRequest(f"d-{rid}", decode_ids or ids, GREEDY, kv_descriptor=descriptor,
                                                first_token=first), timeout=120))
    return [first] + [t for c in rest for t in c.output_ids], rest[-1]


def test_torch_prefill_then_vllm_decode_equals_vllm_alone(vllm_engine, torch32, tok) -> None:
    for question in ("What is the capital of France?", "Write a short poem about the sea. " * 6):
        ids = _prompt(tok, question)
        handed, last = _handoff(torch32, vllm_engine, ids)
        assert last.finish_reason == "length" and last.num_input_tokens == len(ids)
        assert handed == _run(vllm_engine, GenerateRequest(f"a-{uuid.uuid4().hex[:8]}", ids, GREEDY)), tok.decode(handed)
    assert wait_for(lambda: torch32.stats().held_blocks == 0, timeout=10), "vLLM released the torch engine's leases"


def test_vllm_prefill_then_torch_decode_equals_torch_alone(vllm_engine, torch32, tok) -> None:
    ids = _prompt(tok, "Name three primary colors and say why they are primary.")
    handed, _ = _handoff(vllm_engine, torch32, ids)
    assert handed == _run(torch32, GenerateRequest(f"a-{uuid.uuid4().hex[:8]}", ids, GREEDY)), tok.decode(handed)
    assert wait_for(lambda: vllm_engine.stats().held_blocks == 0, timeout=10), "the staging blocks came back"


def test_the_loaded_kv_is_what_vllm_decodes_from(vllm_engine, torch32, tok) -> None:
    """The decode worker is given one prompt's ids and another's KV (same length): it answers
    the KV's prompt, so the prompt was loaded, not recomputed."""
    session = f"Session {uuid.uuid4().hex}."
    france, italy = (tuple(tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": session}, {"role": "user", "content": f"What is the capital of {c}?"}])))
        for c in ("France", "Italy"))
    assert len(france) == len(italy)
    reference = _run(torch32, GenerateRequest("fr", france, GREEDY))
    assert reference != _run(torch32, GenerateRequest("it", italy, GREEDY))
    handed, _ = _handoff(torch32, vllm_engine, france, decode_ids=italy)
    assert handed == reference, tok.decode(handed)
    # a prompt of another length is refused before anything is loaded
    chunks = list(torch32.generate(GenerateRequest("p-short", france, SamplingParams(max_tokens=1), hold_kv=True)))
    with pytest.raises(ValidationError, match=f"kv_descriptor: covers {len(france)} tokens, the prompt has {len(france) - 1}"):
        vllm_engine.submit(GenerateRequest("d-short", france[:-1], GREEDY, kv_descriptor=chunks[-1].kv_descriptor,
                                           first_token=chunks[-1].output_ids[0]), lambda c: None)


def test_a_descriptor_in_another_layout_is_refused_naming_both(vllm_engine, tok) -> None:
    torch16 = TorchEngine(TorchEngineConfig(dtype="float32", kv_cache_mb=16, num_threads=1, shareable_kv=True,
                                            worker_id="torch-16"))
    torch16.start()
    try:
        ids = _prompt(tok, "Hello!")
        chunks = list(torch16.generate(GenerateRequest("p16", ids, SamplingParams(max_tokens=1), hold_kv=True)))
        with pytest.raises(ValidationError, match="kv_descriptor: KV layout mismatch.*block_size=16.*block_size=32"):
            vllm_engine.submit(GenerateRequest("d16", ids, GREEDY, kv_descriptor=chunks[-1].kv_descriptor,
                                               first_token=chunks[-1].output_ids[0]), lambda c: None)
    finally:
        torch16.shutdown()


def test_a_prefill_worker_gone_before_the_pull_means_vllm_recomputes(vllm_engine, tok) -> None:
    gone = TorchEngine(TorchEngineConfig(dtype="float32", block_size=32, kv_cache_mb=16, num_threads=1,
                                         shareable_kv=True, worker_id="torch-gone"))
    gone.start()
    ids = _prompt(tok, "What is 12 times 12?")
    try:
        chunks = list(gone.generate(GenerateRequest("pg", ids, SamplingParams(max_tokens=1, temperature=0.0), hold_kv=True)))
    finally:
        gone.shutdown()  # its pool is unlinked: the descriptor points nowhere
    first = chunks[-1].output_ids[0]
    rest = _run(vllm_engine, GenerateRequest("dg", ids, GREEDY, kv_descriptor=chunks[-1].kv_descriptor, first_token=first))
    assert [first] + rest == _run(vllm_engine, GenerateRequest("ag", ids, GREEDY))
