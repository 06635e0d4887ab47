"""A request continued by another engine draws what one engine would have: after a prefill
handoff (`kv_descriptor` + `first_token`) and after a migration (`output_offset`), for greedy
and seeded sampling. And a prefill whose first token ends the request leases nothing.
Real engines on the tiny model, in this process (the KV moves through shared memory)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from plugins.torch_engine.sampler import position_seed
from tests.waiting import wait_until
from trident.core.types import GenerateRequest, SamplingParams

PROMPT = tuple(range(20, 61))
N = 12


def _engine(model_dir: str, name: str, **kw) -> TorchEngine:
    cfg = TorchEngineConfig(model=model_dir, dtype="float32", block_size=4, num_blocks=96, num_threads=1,
                            worker_id=name, **kw)
    engine = TorchEngine(cfg)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engines(tiny_model_dir: str) -> Iterator[dict[str, TorchEngine]]:
    torch.set_num_threads(1)
    made = {
        "one": _engine(tiny_model_dir, "one"),
        "other": _engine(tiny_model_dir, "other"),
        "prefill": _engine(tiny_model_dir, "prefill", shareable_kv=True, lease_ttl_s=30.0),
    }
    yield made
    for engine in made.values():
        engine.shutdown()


def _tokens(engine: TorchEngine, request: GenerateRequest) -> list[int]:
    return [t for chunk in engine.generate(request, timeout=60) for t in chunk.output_ids]


SAMPLINGS = {
    "greedy": SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=N, temperature=1.3, top_k=50, seed=1234, ignore_eos=True),
}


@pytest.mark.parametrize("kind", sorted(SAMPLINGS))
def test_a_migrated_request_continues_the_same_tokens(engines, kind: str) -> None:
    sp = SAMPLINGS[kind]
    whole = _tokens(engines["one"], GenerateRequest(f"whole-{kind}", PROMPT, sp))
    assert len(whole) == N
    for cut in (1, 5, N - 1):
        # the lost worker produced `cut` tokens; another continues from the prompt plus those
        head = _tokens(engines["one"], GenerateRequest(f"head-{kind}-{cut}", PROMPT, SamplingParams(
            **{**_fields(sp), "max_tokens": cut})))
        assert head == whole[:cut]
        rest_sp = SamplingParams(**{**_fields(sp), "max_tokens": N - cut})
        resumed = GenerateRequest(f"rest-{kind}-{cut}", PROMPT + tuple(head), rest_sp, output_offset=cut)
        assert head + _tokens(engines["other"], resumed) == whole, f"cut after {cut}"


@pytest.mark.parametrize("kind", sorted(SAMPLINGS))
def test_a_handed_off_request_continues_the_same_tokens(engines, kind: str) -> None:
    sp = SAMPLINGS[kind]
    whole = _tokens(engines["one"], GenerateRequest(f"agg-{kind}", PROMPT, sp))
    prefill_sp = SamplingParams(**{**_fields(sp), "max_tokens": 1})
    chunks = list(engines["prefill"].generate(GenerateRequest(f"pre-{kind}", PROMPT, prefill_sp, hold_kv=True), timeout=60))
    first, desc = chunks[-1].output_ids[0], chunks[-1].kv_descriptor
    assert desc
    assert engines["prefill"].stats().leases == 1  # the gauge behind trident_kv_leases_active
    rest = _tokens(engines["other"], GenerateRequest(f"dec-{kind}", PROMPT, sp, kv_descriptor=desc, first_token=first))
    assert [first, *rest] == whole
    wait_until(lambda: engines["prefill"].stats().leases == 0)  # the pull released the lease
    assert engines["prefill"].stats().held_blocks == 0


def test_a_first_token_that_ends_the_request_takes_no_lease(engines) -> None:
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    (first,) = _tokens(engines["one"], GenerateRequest("probe", PROMPT, greedy))
    stop_at_once = SamplingParams(max_tokens=1, temperature=0.0, stop_token_ids=(first,))
    chunks = list(engines["prefill"].generate(GenerateRequest("eos", PROMPT, stop_at_once, hold_kv=True), timeout=60))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].kv_descriptor is None
    stats = engines["prefill"].stats()
    assert stats.leases == 0 and stats.held_blocks == 0 and stats.active_blocks == 0


def test_position_seeds_differ_across_positions_and_seeds() -> None:
    seeds = {position_seed(s, p) for s in range(50) for p in range(50)}
    assert len(seeds) == 2500 and all(0 <= x < 2**63 for x in seeds)


def _fields(sp: SamplingParams) -> dict:
    return {name: getattr(sp, name) for name in SamplingParams.__slots__}


def test_an_abort_after_the_prefill_revokes_its_lease(engines) -> None:
    prefill = engines["prefill"]
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    chunks = list(prefill.generate(GenerateRequest("revoked", PROMPT, sp, hold_kv=True), timeout=60))
    assert chunks[-1].kv_descriptor and prefill.stats().leases == 1
    prefill.abort("revoked")  # the router will not hand the descriptor over
    wait_until(lambda: prefill.stats().leases == 0 and prefill.stats().held_blocks == 0, timeout=2)
    prefill.abort("never-seen")  # unknown ids stay a no-op
