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
from trident.core.types import GenerateRequest, SamplingParams

pytestmark = pytest.mark.skipif(kernels.supported() is not None, reason=f"CPU kernels: {kernels.supported()}")


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


def _reference_attention(q, pool, layer, tables, lens, scale):
    _, _, _, bs, kvh, hd = pool.shape
    out = []
    for s in range(q.shape[0]):
        n = int(lens[s])
        keys = pool[tables[s], layer, 0].reshape(-1, kvh, hd)[:n].transpose(0, 1)
        values = pool[tables[s], layer, 1].reshape(-1, kvh, hd)[:n].transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[s][:, None], keys, values, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 16), (10, 2, 8), (12, 1, 32)])
def test_decode_attention_reads_the_paged_pool_in_place(k, heads, kv_heads, dim):
    torch.manual_seed(heads * kv_heads + dim)
    blocks, layers, bs = 30, 3, 16
    pool = torch.randn(blocks, layers, 2, bs, kv_heads, dim)
    assert k.handles_attention(pool, heads)
    lens = torch.tensor([1, 16, 17, 100, 33], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks)[:7] for _ in range(5)])  # padded past each length
    q = torch.randn(5, heads, dim)
    for layer in (0, 2):
        out = k.decode_attention(q, pool[:, layer], tables, lens, 0.3)
        torch.testing.assert_close(out, _reference_attention(q, pool, layer, tables, lens, 0.3), rtol=1e-5, atol=1e-5)


def test_attention_refuses_pools_it_cannot_read(k):
    assert not k.handles_attention(torch.zeros(4, 1, 2, 16, 2, 12), 4)  # head_dim not a multiple of 8
    assert not k.handles_attention(torch.zeros(4, 1, 2, 16, 2, 16, dtype=torch.bfloat16), 4)


def test_build_is_cached_under_the_cache_root(tmp_path):
    lib = kernels.load(str(tmp_path))
    assert lib is not None
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "kernels").iterdir() if p not in built]
    assert kernels._build(str(tmp_path)) == built[0]  # found again, not rebuilt


def test_without_a_compiler_the_model_keeps_pytorch(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="plugins.torch_engine.kernels"):
        assert kernels._load(str(tmp_path)) is None
    assert "no C compiler" in caplog.text


def test_a_library_built_beside_the_source_needs_no_compiler(monkeypatch, tmp_path):
    import shutil

    from plugins.torch_engine.kernels.__main__ import main

    source = tmp_path / "src" / "cpu_kernels.c"
    source.parent.mkdir()
    shutil.copy(kernels._SOURCE, source)
    monkeypatch.setattr(kernels, "_SOURCE", source)
    assert main() == 0  # as in docker/Dockerfile's build stage
    assert (source.parent / kernels.library_name()).exists()
    monkeypatch.setattr(kernels, "_compiler", lambda: None)  # the runtime stage
    assert kernels._load(str(tmp_path / "cache")) is not None
    assert not (tmp_path / "cache").exists()


def _greedy_tokens(model_dir: str, on: bool, prompts: list[list[int]]) -> dict[str, list[int]]:
    cfg = TorchEngineConfig(model=model_dir, dtype="float32", block_size=4, num_blocks=64, num_threads=1, cpu_kernels=on)
    engine = TorchEngine(cfg)
    engine.start()
    try:
        assert (engine.runner.model.kernels is not None) == on
        assert (engine.runner.kernels is not None) == on
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
