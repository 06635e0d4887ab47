"""The torch engine on a CUDA device: greedy output equals transformers on the same GPU,
alone and batched, in float32 and bfloat16 (bf16 checked for agreement of the first tokens)."""

from __future__ import annotations

import pytest
import torch

from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from trident.core.types import GenerateRequest, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 9, 13, 17, 21], list(range(3, 40)), [7] * 19, list(range(60, 100))]
NEW = 16


def _hf(model_dir: str, prompt: list[int]) -> list[int]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


def _collect(engine: TorchEngine, reqs: list[GenerateRequest]) -> dict[str, list[int]]:
    import queue

    q: queue.Queue = queue.Queue()
    for r in reqs:
        engine.submit(r, q.put)
    out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    done = 0
    while done < len(reqs):
        c = q.get(timeout=120)
        out[c.request_id].extend(c.output_ids)
        done += c.finished
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_on_cuda_matches_transformers(tiny_model_dir, dtype):
    expected = [_hf(tiny_model_dir, p) for p in PROMPTS]
    eng = TorchEngine(TorchEngineConfig(model=tiny_model_dir, device="cuda", dtype=dtype, block_size=4, num_blocks=128))
    eng.start()
    try:
        assert eng.info().device.startswith("cuda")
        sp = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0)
        solo = [_collect(eng, [GenerateRequest(f"s{i}", tuple(p), sp)])[f"s{i}"] for i, p in enumerate(PROMPTS)]
        batch = _collect(eng, [GenerateRequest(f"b{i}", tuple(p), sp) for i, p in enumerate(PROMPTS)])
        if dtype == "float32":
            assert solo == expected
            assert [batch[f"b{i}"] for i in range(len(PROMPTS))] == expected
        else:  # bf16 rounding may flip a late near-tie; the first tokens must agree
            assert all(s[:4] == e[:4] for s, e in zip(solo, expected, strict=True))
        assert eng.stats().active_blocks == 0
    finally:
        eng.shutdown()


def test_kind_gpu_instance_runs_on_its_device(tiny_model_dir):
    """What the decode model does for a KIND_GPU instance: `model_instance_device_id` picks the GPU."""
    from plugins.triton.engines import build_engine

    device_id = torch.cuda.device_count() - 1
    args = {"model_instance_kind": "GPU", "model_instance_device_id": str(device_id)}
    params = {"model": tiny_model_dir, "dtype": "float32", "block_size": "4", "num_blocks": "64"}
    before = torch.cuda.memory_allocated(device_id)
    eng = build_engine("decode", params, args)
    eng.start()
    try:
        assert eng.info().device == f"cuda:{device_id}"
        assert torch.cuda.memory_allocated(device_id) > before  # weights and KV pool live there
        sp = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0)
        out = _collect(eng, [GenerateRequest("g", tuple(PROMPTS[1]), sp)])["g"]
        assert out == _hf(tiny_model_dir, PROMPTS[1])
    finally:
        eng.shutdown()
