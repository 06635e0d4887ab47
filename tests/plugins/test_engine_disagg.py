"""Disaggregated prefill/decode between two engines in two processes: the prefill engine
holds the prompt's KV under a lease, the decode engine pulls it (POSIX shared memory on
CPU, CUDA IPC on GPU; or through NIXL, as from another node) and continues. Greedy output
must equal one aggregated engine's."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from trident.core.types import GenerateRequest, SamplingParams

PROMPTS = [list(range(3, 12)), list(range(20, 77)), [9] * 33, list(range(40, 72))]
NEW = 10


def _cfg(model_dir: str, device: str, **kw) -> TorchEngineConfig:
    return TorchEngineConfig(model=model_dir, dtype="float32", device=device, block_size=4, num_blocks=96,
                             num_threads=1, **kw)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _prefill_worker(model_dir: str, device: str, conn, transport: str = "local") -> None:
    """Child process: a prefill engine answering (request_id, prompt) with (token, descriptor)."""
    eng = TorchEngine(_cfg(model_dir, device, shareable_kv=True, lease_ttl_s=5.0, worker_id="prefill",
                           kv_transport=transport))
    eng.start()
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            if msg == "stats":
                conn.send(eng.stats())
                continue
            rid, prompt = msg
            chunks = list(eng.generate(GenerateRequest(rid, tuple(prompt), _greedy(1), hold_kv=True), timeout=60))
            last = chunks[-1]
            conn.send((last.output_ids[0] if last.output_ids else chunks[0].output_ids[0], last.kv_descriptor))
    finally:
        eng.shutdown()


def _tokens(engine: TorchEngine, req: GenerateRequest) -> list[int]:
    return [t for c in engine.generate(req, timeout=60) for t in c.output_ids]


def _run_disagg(model_dir: str, device: str, transport: str = "local") -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill_worker, args=(model_dir, device, child, transport), daemon=True)
    proc.start()
    decode = TorchEngine(_cfg(model_dir, device, worker_id="decode"))
    decode.start()
    try:
        for i, prompt in enumerate(PROMPTS):
            expected = _tokens(decode, GenerateRequest(f"agg{i}", tuple(prompt), _greedy(NEW)))
            parent.send((f"p{i}", prompt))
            first, desc = parent.recv()
            assert desc, "prefill engine returned no KV descriptor"
            rest = _tokens(decode, GenerateRequest(f"dis{i}", tuple(prompt), _greedy(NEW), kv_descriptor=desc, first_token=first))
            assert [first, *rest] == expected, f"prompt {i}"
        # The decode side released every lease: the prefill engine holds no blocks any more.
        for _ in range(50):
            parent.send("stats")
            stats = parent.recv()
            if stats.held_blocks == 0 and stats.active_blocks == 0:
                break
            time.sleep(0.1)
        assert stats.held_blocks == 0 and stats.active_blocks == 0
    finally:
        parent.send(None)
        proc.join(30)
        decode.shutdown()
    assert proc.exitcode == 0


def test_disaggregated_equals_aggregated_cpu(tiny_model_dir):
    _run_disagg(tiny_model_dir, "cpu")


def test_disaggregated_over_nixl_equals_aggregated(tiny_model_dir, monkeypatch):
    # both engines read the cluster's KV secret from the environment (the child inherits it)
    monkeypatch.setenv("TRIDENT_KV_SECRET", "nixl-test-secret-0123456789abcdef")
    _run_disagg(tiny_model_dir, "cpu", transport="nixl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_disaggregated_equals_aggregated_cuda(tiny_model_dir):
    _run_disagg(tiny_model_dir, "cuda")


def test_lease_expires_when_nobody_pulls(tiny_model_dir):
    eng = TorchEngine(_cfg(tiny_model_dir, "cpu", shareable_kv=True, lease_ttl_s=0.3))
    eng.start()
    try:
        chunks = list(eng.generate(GenerateRequest("x", tuple(range(3, 40)), _greedy(1), hold_kv=True), timeout=60))
        assert chunks[-1].kv_descriptor
        assert eng.stats().held_blocks == 10  # ceil(37 / 4)
        deadline = time.monotonic() + 10
        while eng.stats().held_blocks and time.monotonic() < deadline:
            time.sleep(0.1)
        assert eng.stats().held_blocks == 0 and eng.stats().active_blocks == 0
    finally:
        eng.shutdown()


def test_import_of_bad_descriptor_fails_the_request_only(tiny_model_dir):
    eng = TorchEngine(_cfg(tiny_model_dir, "cpu"))
    eng.start()
    try:
        chunks = list(eng.generate(GenerateRequest("bad", (5, 6, 7), _greedy(3), kv_descriptor=b"\x01garbage", first_token=5), timeout=30))
        assert chunks[-1].finish_reason == "error" and "descriptor" in (chunks[-1].error or "").lower()
        assert _tokens(eng, GenerateRequest("ok", (5, 6, 7), _greedy(3)))  # still serving
        assert eng.stats().active_blocks == 0
    finally:
        eng.shutdown()
