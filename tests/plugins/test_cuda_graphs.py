"""Decode graphs (`plugins.torch_engine.cuda_graphs`) on the CPU: the capture replaced by an
eager stand-in, the graph runner's greedy tokens equal the eager runner's (padded rows and
padded widths included), buckets are chosen as designed, and prefill, mixed and
prompt-logprob steps stay eager. The real CUDA capture runs in tests/gpu."""

from __future__ import annotations

import os

import pytest
import torch

from kv_manager.block_pool import BlockPool
from kv_manager.kv_cache_manager import KVCacheManager
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.cuda_graphs import DecodeGraphs, batch_buckets, width_buckets
from plugins.torch_engine.runner import ModelRunner
from plugins.torch_engine.sampler import make_state
from plugins.torch_engine.scheduler import Scheduler
from plugins.torch_engine.sequence import Sequence
from plugins.torch_engine.setup import build_parts
from trident.core.types import GenerateRequest, SamplingParams

BLOCK = 4


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    cfg = TorchEngineConfig(model=tiny_model_dir, dtype="float32", block_size=BLOCK, num_blocks=96, cpu_kernels=False)
    p = build_parts(cfg)
    yield p
    p.close()


class _EagerCapture:
    """Stands in for `CudaGraphCapture`: one warm-up call, then the forward itself as the
    replay; counts replays."""

    def __init__(self) -> None:
        self.replays = 0

    def __call__(self, forward):
        forward()

        def replay():
            self.replays += 1
            return forward()

        return replay


def _graphs(parts, capture, max_num_seqs=8, max_graphs=64) -> DecodeGraphs:
    pool = parts.memory.tensor
    return DecodeGraphs(parts.model, pool, BLOCK, max_num_seqs, parts.info.max_model_len, capture, max_graphs=max_graphs)


def _drive(runner: ModelRunner, parts, arrivals: dict[int, list[tuple[list[int], int]]], logprobs_of=()):
    """A minimal engine loop: at step k the prompts `arrivals[k]` (prompt, max_tokens) join;
    returns each request's greedy tokens and, per step, whether it was decode-only."""
    kv = KVCacheManager(BlockPool(parts.info.num_blocks, BLOCK, False))
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=512)
    out: dict[str, list[int]] = {}
    limits: dict[str, int] = {}
    decode_only: list[bool] = []
    step = 0
    while step <= max(arrivals) or sched.has_work():
        for prompt, max_tokens in arrivals.get(step, []):
            rid = f"r{len(out)}"
            sp = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=1 if rid in logprobs_of else None)
            req = GenerateRequest(rid, tuple(prompt), sp)
            sched.add(Sequence(req, lambda c: None, make_state(sp, parts.info.eos_token_ids), list(prompt), len(prompt)))
            out[rid], limits[rid] = [], max_tokens
        step += 1
        batch, failed = sched.schedule()
        assert not failed and batch.seqs
        decode_only.append(batch.num_decode == len(batch.seqs))
        sampled = runner.run(batch)
        sched.update(batch)
        for seq, token, _ in sampled:
            out[seq.request_id].append(token)
            seq.token_ids.append(token)
            seq.num_outputs += 1
            if seq.num_outputs >= limits[seq.request_id]:
                sched.remove(seq)
    return out, decode_only


PROMPTS = [[5, 9, 13, 17, 21], list(range(3, 40)), [7] * 19, list(range(60, 71)), [11, 3]]


@pytest.mark.parametrize("n", [1, 3, 5])
def test_graph_runner_gives_the_eager_tokens(parts, n):
    # Different lengths and max_tokens: the batch shrinks (buckets 8, 4, 2, 1 with padded
    # rows), and widths grow past powers of two while decoding (padded tables).
    arrivals = {0: [(PROMPTS[i], 6 + 3 * i) for i in range(n)]}
    pool = parts.memory.tensor
    eager, _ = _drive(ModelRunner(parts.model, pool, BLOCK), parts, arrivals)
    capture = _EagerCapture()
    graphs = _graphs(parts, capture)
    replayed, decode_only = _drive(ModelRunner(parts.model, pool, BLOCK, graphs=graphs), parts, arrivals)
    assert replayed == eager
    assert capture.replays == sum(decode_only) == len(decode_only) - 1  # all but the prefill step
    assert graphs.captured[0][0] == {1: 1, 3: 4, 5: 8}[n]
    assert all(b in graphs.batch_buckets and w in graphs.width_buckets for b, w in graphs.captured)
    assert len(graphs.captured) == len(set(graphs.captured)) > 1


def test_prefill_mixed_and_prompt_logprob_steps_stay_eager(parts):
    pool = parts.memory.tensor
    arrivals = {0: [(PROMPTS[0], 8)], 3: [(PROMPTS[1], 4)], 5: [(PROMPTS[2], 5)]}
    eager, _ = _drive(ModelRunner(parts.model, pool, BLOCK), parts, arrivals, logprobs_of={"r2"})
    capture = _EagerCapture()
    runner = ModelRunner(parts.model, pool, BLOCK, graphs=_graphs(parts, capture))
    replayed, decode_only = _drive(runner, parts, arrivals, logprobs_of={"r2"})
    assert replayed == eager
    assert decode_only.count(False) == 3  # the first prefill, then two mixed steps
    assert capture.replays == sum(decode_only)  # decode steps with r2 need no prompt rows


def test_graphs_past_the_cap_or_disabled_run_eagerly(parts):
    pool = parts.memory.tensor
    arrivals = {0: [(PROMPTS[0], 12)]}
    eager, _ = _drive(ModelRunner(parts.model, pool, BLOCK), parts, arrivals)
    capture = _EagerCapture()
    graphs = _graphs(parts, capture, max_graphs=1)
    replayed, _ = _drive(ModelRunner(parts.model, pool, BLOCK, graphs=graphs), parts, arrivals)
    assert replayed == eager and len(graphs.captured) == 1
    assert 0 < capture.replays < 11

    def failing(forward):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = _graphs(parts, failing)
    replayed, _ = _drive(ModelRunner(parts.model, pool, BLOCK, graphs=graphs), parts, arrivals)
    assert replayed == eager and not graphs.enabled and graphs.captured == []


def test_buckets():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,)
    assert width_buckets(2048, 16) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert width_buckets(100, 4) == (1, 2, 4, 8, 16, 25)
    graphs = DecodeGraphs(None, torch.zeros(1), 4, 6, 100, capture=lambda f: f)  # type: ignore[arg-type]
    assert graphs.batch_buckets == (1, 2, 4, 6)
    assert graphs.bucket(1, 1) == (1, 1)
    assert graphs.bucket(3, 3) == (4, 4)
    assert graphs.bucket(5, 9) == (6, 16)
    assert graphs.bucket(6, 25) == (6, 25)
    assert graphs.bucket(7, 1) is None and graphs.bucket(1, 26) is None


def test_engine_builds_graphs_only_on_cuda(parts):
    cfg = TorchEngineConfig(block_size=BLOCK)
    runner = ModelRunner.for_engine(parts.model, parts.memory.tensor, cfg, parts.info.max_model_len)
    assert runner.graphs is None  # a CPU pool: the flag has no effect
    assert TorchEngineConfig().cuda_graphs is True
    env = {**os.environ, "TRIDENT_CUDA_GRAPHS": "false"}
    assert TorchEngineConfig.from_mapping({}, env=env).cuda_graphs is False
