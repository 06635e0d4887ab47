"""Greedy outputs of vLLM, our torch engine and transformers on the same prompts, side by side.

    python -m benchmarks.greedy_parity [--dtype float32|bfloat16] [--tokens 24] [--json PATH]

All three read the same weights: vLLM and transformers the Hugging Face directory written
from the default GGUF (`plugins.vllm.model_dir`), our engine the GGUF itself (dequantized to
the same fp32 tensors). Chat prompts, greedy, the end-of-turn token honoured (transformers
keeps it in its output, the engines leave it out; it is stripped before comparing). For each
prompt: how many leading tokens each pair shares, and the texts. Last line:
`greedy parity: vllm=transformers {a}/{n}, torch=transformers {b}/{n}, vllm=torch {c}/{n} prompts identical`.
"""

from __future__ import annotations

import argparse

from benchmarks.common import setup_logging, write_json
from benchmarks.plots import add_plot_flag

QUESTIONS = (
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
    "What is 12 times 12?", "Who wrote Hamlet?", "Explain gravity in one sentence.",
)


def _engine_outputs(engine, prompts, tokens: int) -> list[list[int]]:
    from trident.core.types import GenerateRequest, SamplingParams

    sp = SamplingParams(max_tokens=tokens, temperature=0)
    engine.start()
    try:
        return [[t for c in engine.generate(GenerateRequest(f"p{i}", p, sp), timeout=300) for t in c.output_ids]
                for i, p in enumerate(prompts)]
    finally:
        engine.shutdown()


def _hf_outputs(dtype: str, prompts, tokens: int, eos: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from plugins.vllm.model_dir import hf_model_dir

    model = AutoModelForCausalLM.from_pretrained(hf_model_dir(""), dtype=getattr(torch, dtype)).eval()
    out = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=tokens, do_sample=False, eos_token_id=eos)
        ids = g[0, len(p):].tolist()
        out.append(ids[:-1] if ids and ids[-1] == eos else ids)
    return out


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--json", metavar="PATH")
    add_plot_flag(ap)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    from plugins.torch_engine.config import TorchEngineConfig
    from plugins.torch_engine.engine import TorchEngine
    from plugins.vllm.config import VllmEngineConfig
    from plugins.vllm.engine import VllmEngine
    from router_ensemble.text.tokenizer import load_tokenizer

    tok = load_tokenizer("")
    prompts = [tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))) for q in QUESTIONS]
    outs = {
        "vllm": _engine_outputs(VllmEngine(VllmEngineConfig(dtype=args.dtype, enforce_eager=True, kv_cache_mb=128)),
                                prompts, args.tokens),
        "torch": _engine_outputs(TorchEngine(TorchEngineConfig(dtype=args.dtype, kv_cache_mb=128)), prompts, args.tokens),
        "transformers": _hf_outputs(args.dtype, prompts, args.tokens, tok.eos_token_ids[0]),
    }
    pairs = (("vllm", "transformers"), ("torch", "transformers"), ("vllm", "torch"))
    rows = []
    print(f"dtype {args.dtype}, up to {args.tokens} tokens; numbers: leading tokens two engines share")
    for i, q in enumerate(QUESTIONS):
        shared = {f"{a}={b}": shared_prefix(outs[a][i], outs[b][i]) for a, b in pairs}
        rows.append({"prompt": q, "shared": shared, "texts": {k: tok.decode(v[i]) for k, v in outs.items()},
                     "lengths": {k: len(v[i]) for k, v in outs.items()}})
        print(f"{q:<36} " + "  ".join(f"{k}:{n:>2}" for k, n in shared.items()))
        for k, v in outs.items():
            print(f"    {k:<13}{tok.decode(v[i])!r}")
    same = {f"{a}={b}": sum(outs[a][i] == outs[b][i] for i in range(len(QUESTIONS))) for a, b in pairs}
    write_json(args.json, {"dtype": args.dtype, "tokens": args.tokens, "rows": rows, "identical": same}, plot=args.plot, name="greedy_parity")
    n = len(QUESTIONS)
    print(f"greedy parity: vllm=transformers {same['vllm=transformers']}/{n}, "
          f"torch=transformers {same['torch=transformers']}/{n}, vllm=torch {same['vllm=torch']}/{n} prompts identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
