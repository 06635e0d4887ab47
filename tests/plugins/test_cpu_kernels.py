"""The torch engine's float32 CPU kernels against PyTorch: packed GEMM, in-place paged decode
attention, the build cache and the fallback, and the engine's greedy output with them on and off."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from plugins.torch_engine import kernels
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from plugins.torch_engine.kernels import build
from trident.core.types import GenerateRequest, SamplingParams

pytestmark = pytest.mark.skipif(build.supported() is not None, reason=f"CPU kernels: {build.supported()}")


@pytest.fixture(scope="module")
def k() -> kernels.CpuKernels:
    lib = kernels.load()
    assert lib is not None, "supported() said yes, so the kernels must build and load"
    return lib


@pytest.mark.parametrize("m", [0, 1, 2, 5, 6, 7, 13, 16, 64])
@pytest.mark.parametrize(("n", "kdim"), [(16, 1), (100, 70), (960, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_gemm_matches_linear(k, m, n, kdim, with_bias):
    torch.manual_seed(m * 1000 + n + kdim)
    w, x = torch.randn(n, kdim), torch.randn(m, kdim)
    bias = torch.randn(n) if with_bias else None
    y = k.pack(w, bias)(x)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)


def test_packed_gemm_takes_strided_rows_batched_shapes_and_two_threads(k):
    torch.manual_seed(1)
    w = torch.randn(48, 40)
    packed = k.pack(w)
    wide = torch.randn(9, 100)
    rows = wide[:, 10:50]  # rows 100 floats apart
    torch.testing.assert_close(packed(rows), rows @ w.t(), rtol=1e-5, atol=1e-4)
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(packed(x), x @ w.t(), rtol=1e-5, atol=1e-4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = torch.randn(31, 40)
        torch.testing.assert_close(packed(big), big @ w.t(), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m", [1, 7, 16])
def test_packed_gemm_adds_into_its_output(k, m):
    torch.manual_seed(m)
    w, bias, x, h = torch.randn(64, 40), torch.randn(64), torch.randn(m, 40), torch.randn(m, 64)
    expected = h + F.linear(x, w, bias)
    k.pack(w, bias).add_to(h, x)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-4)
    odd = torch.randn(m, 50)  # 50 rows pad to 64: added from a fresh result instead
    expected = odd + F.linear(x, w[:50])
    k.pack(w[:50]).add_to(odd, x)
    torch.testing.assert_close(odd, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 8, 16, 19])
@pytest.mark.parametrize("kdim", [1, 67, 150, 576])
def test_packed_gemm_adds_over_chunks_of_k_with_a_bias(k, m, kdim):
    """Up to 18 rows take a panel 64 k steps at a time (the bias in the first chunk, later
    chunks adding); one row is a GEMV with four partial sums and a k % 4 tail."""
    torch.manual_seed(m * 7 + kdim)
    w, bias, x, h = torch.randn(80, kdim), torch.randn(80), torch.randn(m, kdim), torch.randn(m, 80)
    expected = h + F.linear(x, w, bias)
    k.pack(w, bias).add_to(h, x)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n", [16, 48, 960, 3072])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_packed_gemm_threads_share_the_panels_between_them(k, threads, n, m):
    """The threads take runs of panels from a counter: every panel exactly once, whatever the
    count (1 panel, fewer panels than runs, thousands)."""
    torch.manual_seed(n + m)
    w, x = torch.randn(n, 96), torch.randn(m, 96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = k.pack(w)(x)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("vocab", [1, 5, 8, 9, 64, 1003, 49152])
def test_argmax_matches_torch(k, vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab)
    logits[1] = 0.0  # all tied: the first index
    logits[2] = float("-inf")
    logits[3, -1] = 1e4  # the maximum in the tail after the vectors
    logits[4, vocab // 2] = float("nan")  # a NaN counts as the maximum, as in torch
    logits[4, -1] = float("nan")
    if vocab > 2:
        logits[5, 1] = logits[5, vocab - 1] = 1e4  # a tie between lanes: the lower index
    assert k.argmax(logits) == logits.argmax(dim=-1).tolist()
    wide = torch.randn(3, vocab + 7)
    assert k.argmax(wide[:, 3 : 3 + vocab]) == wide[:, 3 : 3 + vocab].argmax(dim=-1).tolist()


@pytest.mark.parametrize("dim", [8, 20, 576])
def test_rms_norm_matches_the_model(k, dim):
    from plugins.torch_engine.llama import rms_norm

    torch.manual_seed(dim)
    x, w = torch.randn(5, dim) * 3, torch.randn(dim)
    torch.testing.assert_close(k.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    rows = torch.randn(5, dim + 4)[:, 2 : dim + 2]  # strided rows
    torch.testing.assert_close(k.rms_norm(rows, w, 1e-6), rms_norm(rows, w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [8, 13, 1536])
def test_silu_mul_matches_swiglu(k, width):
    torch.manual_seed(width)
    gu = torch.randn(6, 2 * width) * 6  # into exp's range ends
    gu[0, 0], gu[0, 1] = 100.0, -100.0
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(k.silu_mul(gu), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 16), (4, 1, 8)])
def test_rope_store_rotates_queries_and_writes_the_pool(k, heads, kv_heads, dim):
    from plugins.torch_engine.attention import AttentionMetadata, write_kv
    from plugins.torch_engine.llama import apply_rope

    torch.manual_seed(heads + dim)
    t, layer = 5, 1
    pool, expected_pool = torch.zeros(8, 2, 2, 4, kv_heads, dim), torch.zeros(8, 2, 2, 4, kv_heads, dim)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim + 16)[:, : (heads + 2 * kv_heads) * dim]  # strided rows
    angles = torch.randn(t, dim // 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    blocks, offsets = torch.tensor([3, 3, 0, 7, 5]), torch.tensor([0, 3, 1, 2, 3])
    q, key, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    expected_q = apply_rope(q.reshape(t, heads, dim), cos, sin)
    meta = AttentionMetadata(blocks, offsets, 0, None, None, None, [])
    write_kv(expected_pool, layer, apply_rope(key.reshape(t, kv_heads, dim), cos, sin), v.reshape(t, kv_heads, dim), meta)
    k.rope_store(qkv, cos, sin, heads, kv_heads, pool[:, layer], blocks, offsets)
    torch.testing.assert_close(qkv[:, : heads * dim].reshape(t, heads, dim), expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool, expected_pool, rtol=1e-5, atol=1e-5)


def test_two_callers_at_once_share_the_thread_pool_safely(k):
    """One caller at a time gets the pool's workers; the other runs its GEMM alone."""
    torch.manual_seed(2)
    w = torch.randn(256, 96)
    packed = k.pack(w)
    xs = [torch.randn(20, 96) for _ in range(2)]
    wrong: list[int] = []

    def caller(i: int) -> None:
        torch.set_num_threads(2)  # per thread
        for _ in range(200):
            if not torch.allclose(packed(xs[i]), xs[i] @ w.t(), rtol=1e-5, atol=1e-4):
                wrong.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not wrong


def test_a_forked_child_runs_the_kernels_without_the_parents_workers(k):
    import multiprocessing

    torch.manual_seed(3)
    w, x = torch.randn(64, 32), torch.randn(12, 32)
    packed = k.pack(w)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        packed(x)  # the parent's pool has a worker now
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as child:
            got = child.apply_async(_gemm_in_child, (w, x)).get(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert got


def _gemm_in_child(w, x) -> bool:
    # torch itself on one thread: GNU OpenMP hangs in a forked child of a process that ran a
    # parallel region; the kernels are asked for two threads directly.
    torch.set_num_threads(1)
    packed = kernels.load().pack(w)
    y = torch.empty(x.shape[0], w.shape[0])
    packed._k._gemm(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), packed.panels.data_ptr(), w.shape[0],
                    y.data_ptr(), y.stride(0), 0, 0, 2)
    return bool(torch.allclose(y, x @ w.t(), rtol=1e-5, atol=1e-4))


def _reference_attention(q, pool, layer, tables, lens, scale):
    _, _, _, bs, kvh, hd = pool.shape
    out = []
    for s in range(q.shape[0]):
        n = int(lens[s])
        keys = pool[tables[s], layer, 0].reshape(-1, kvh, hd)[:n].transpose(0, 1)
        values = pool[tables[s], layer, 1].reshape(-1, kvh, hd)[:n].transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[s][:, None], keys, values, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 16), (10, 2, 8), (12, 1, 32), (8, 2, 128), (6, 3, 72)])
def test_decode_attention_reads_the_paged_pool_in_place(k, heads, kv_heads, dim):
    torch.manual_seed(heads * kv_heads + dim)
    blocks, layers, bs = 30, 3, 16
    pool = torch.randn(blocks, layers, 2, bs, kv_heads, dim)
    assert k.handles_attention(pool, heads)
    lens = torch.tensor([1, 16, 17, 100, 33], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks)[:7] for _ in range(5)])  # padded past each length
    q = torch.randn(5, heads, dim)
    before = torch.get_num_threads()
    try:
        for layer, threads in ((0, 1), (2, 2)):
            torch.set_num_threads(threads)
            out = k.decode_attention(q, pool[:, layer], tables, lens, 0.3)
            torch.testing.assert_close(out, _reference_attention(q, pool, layer, tables, lens, 0.3), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
    rows = torch.randn(5, heads * dim + 24)  # queries as the front of fused q/k/v rows
    rows[:, : heads * dim] = q.reshape(5, -1)
    out = k.decode_attention(rows[:, : heads * dim].view(5, heads, dim), pool[:, 1], tables, lens, 0.3)
    torch.testing.assert_close(out, _reference_attention(q, pool, 1, tables, lens, 0.3), rtol=1e-5, atol=1e-5)


def test_attention_refuses_pools_it_cannot_read(k):
    assert not k.handles_attention(torch.zeros(4, 1, 2, 16, 2, 12), 4)  # head_dim not a multiple of 8
    assert not k.handles_attention(torch.zeros(4, 1, 2, 16, 2, 16, dtype=torch.bfloat16), 4)


def test_build_is_cached_under_the_cache_root(tmp_path):
    lib = kernels.load(str(tmp_path))
    assert lib is not None
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "kernels").iterdir() if p not in built]
    assert build.build(str(tmp_path)) == built[0]  # found again, not rebuilt


def test_without_a_compiler_the_model_keeps_pytorch(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(build, "compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="plugins.torch_engine.kernels"):
        assert kernels._load(str(tmp_path)) is None
    assert "no C compiler" in caplog.text


def test_a_library_built_beside_the_source_needs_no_compiler(monkeypatch, tmp_path):
    import shutil

    from plugins.torch_engine.kernels.__main__ import main

    source = tmp_path / "src"
    source.mkdir()
    for path in build.sources():
        shutil.copy(path, source)
    monkeypatch.setattr(build, "SOURCE_DIR", source)
    assert main() == 0  # as in docker/Dockerfile's build stage
    assert (source / build.library_name()).exists()
    monkeypatch.setattr(build, "compiler", lambda: None)  # the runtime stage
    assert kernels._load(str(tmp_path / "cache")) is not None
    assert not (tmp_path / "cache").exists()


def _greedy_tokens(model_dir: str, on: bool, prompts: list[list[int]]) -> dict[str, list[int]]:
    cfg = TorchEngineConfig(model=model_dir, dtype="float32", block_size=4, num_blocks=64, num_threads=1, cpu_kernels=on)
    engine = TorchEngine(cfg)
    engine.start()
    try:
        assert (engine.runner.model.kernels is not None) == on
        assert (engine.runner.kernels is not None) == on
        assert (engine.runner.model.decode_layers is not None) == on  # decode steps: every layer in one call
        out: dict[str, list[int]] = {}
        done = threading.Semaphore(0)
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
            out[rid] = []

            def sink(chunk, rid=rid):
                out[rid].extend(chunk.output_ids)
                if chunk.finished:
                    done.release()

            sampling = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            engine.submit(GenerateRequest(request_id=rid, input_ids=tuple(prompt), sampling=sampling), sink)
        for _ in prompts:
            assert done.acquire(timeout=60)
        return out
    finally:
        engine.shutdown()


def test_engine_output_is_the_same_with_and_without_the_kernels(tiny_model_dir):
    prompts = [[5, 9, 13], list(range(3, 40)), [7] * 19]
    assert _greedy_tokens(tiny_model_dir, True, prompts) == _greedy_tokens(tiny_model_dir, False, prompts)


def test_engine_config_reads_the_switch_from_the_environment():
    cfg = TorchEngineConfig.from_mapping({}, env={**os.environ, "TRIDENT_CPU_KERNELS": "false"})
    assert cfg.cpu_kernels is False
