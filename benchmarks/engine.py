"""Our torch engine vs Hugging Face transformers `generate()` on the same model and prompts.

    python -m benchmarks.engine [--json PATH] [--dtype bfloat16|float32] [--new-tokens N]

Measures, in one run on one machine: decode tokens/s at batch 1 and batch 16, prefill
tokens/s, and our batch-1 decode step time against the memory-bandwidth bound (weight bytes
read per step / measured copy bandwidth). Both sides use the same threads; transformers runs
in its fastest dtype for GGUF checkpoints (float32) unless --hf-dtype says otherwise.
Last line: `engine: batch16 decode {x}x transformers, batch1 {y}x, roofline {z}%`.
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

import torch

from benchmarks.common import copy_bandwidth_gbs, setup_logging, write_json
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from router_ensemble.text.tokenizer import load_tokenizer
from trident.core.model_files import default_model_path
from trident.core.types import GenerateRequest, SamplingParams

TOPICS = ["the ocean", "a bicycle", "volcanoes", "the moon", "bread", "chess", "rain", "music"]


def make_prompts(tok, n: int, words: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = f"Write a short story about {TOPICS[i % len(TOPICS)]} (variant {i}). " + "Details: " + " ".join(
            f"item{j}" for j in range(words)
        )
        out.append(tok.encode(text))
    return out


# -- our engine ---------------------------------------------------------------------------
def ours_decode(engine: TorchEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, mean step seconds): time from the last first-token to the end."""
    firsts: dict[str, float] = {}
    ends: list[float] = []
    done = threading.Semaphore(0)

    def sink_for(rid):
        def sink(c):
            now = time.perf_counter()
            firsts.setdefault(rid, now)
            if c.finished:
                ends.append(now)
                done.release()
        return sink

    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    tag = f"d{len(prompts)}-{time.monotonic_ns()}"
    for i, p in enumerate(prompts):
        engine.submit(GenerateRequest(f"{tag}-{i}", tuple(p), sp), sink_for(f"{tag}-{i}"))
    for _ in prompts:
        done.acquire()
    span = max(ends) - max(firsts.values())
    tokens = len(prompts) * (new_tokens - 1)
    return tokens / span, span / (new_tokens - 1)


def ours_prefill(engine: TorchEngine, prompts: list[list[int]]) -> float:
    done = threading.Semaphore(0)
    sp = SamplingParams(max_tokens=1, temperature=0)
    tag = f"p-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(GenerateRequest(f"{tag}-{i}", tuple(p), sp), lambda c: c.finished and done.release())
    for _ in prompts:
        done.acquire()
    return sum(map(len, prompts)) / (time.perf_counter() - t0)


# -- transformers -------------------------------------------------------------------------
def hf_generate_time(model, prompts: list[list[int]], new_tokens: int) -> float:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=2)
    return time.perf_counter() - t0


def hf_decode(model, prompts, new_tokens: int) -> float:
    """Decode tokens/s: generate(n) minus generate(1) isolates the n-1 decode steps."""
    full = hf_generate_time(model, prompts, new_tokens)
    first = min(hf_generate_time(model, prompts, 1) for _ in range(2))
    return len(prompts) * (new_tokens - 1) / max(full - first, 1e-9)


def hf_prefill(model, prompts) -> float:
    t = hf_generate_time(model, prompts, 1)
    return sum(map(len, prompts)) / t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--prefill-words", type=int, default=180)
    ap.add_argument("--hf-dtype", default="float32", choices=["bfloat16", "float32"],
                    help="transformers dtype (its GGUF kernels are fastest in float32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    path = default_model_path()
    tok = load_tokenizer(path)
    p1 = make_prompts(tok, 1, args.prompt_words)
    p16 = make_prompts(tok, 16, args.prompt_words)
    pre = make_prompts(tok, 8, args.prefill_words)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine = TorchEngine(TorchEngineConfig(dtype=args.dtype, kv_cache_mb=192, enable_prefix_caching=False,
                                           max_num_batched_tokens=1024, num_threads=args.threads))
    engine.start()
    rss_engine_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    ours_decode(engine, p1, 8)  # warm-up
    ours = {
        "decode_b1_tok_s": ours_decode(engine, p1, args.new_tokens)[0],
        "decode_b16_tok_s": ours_decode(engine, p16, args.new_tokens)[0],
        "prefill_tok_s": ours_prefill(engine, pre),
    }
    steps = [ours_decode(engine, p1, args.new_tokens)[1] for _ in range(3)]
    step_s = min(steps)
    weight_bytes = engine.runner.model.weight_bytes()
    engine.shutdown()

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=getattr(torch, args.hf_dtype)).eval()
    hf_generate_time(hf, p1, 4)  # warm-up
    theirs = {
        "decode_b1_tok_s": hf_decode(hf, p1, args.new_tokens),
        "decode_b16_tok_s": hf_decode(hf, p16, args.new_tokens),
        "prefill_tok_s": hf_prefill(hf, pre),
    }
    del hf
    bw = copy_bandwidth_gbs()
    bound_s = weight_bytes / (bw * 1e9)
    roofline = 100.0 * bound_s / step_s
    print(f"model {os.path.basename(path)}  ours {args.dtype}  transformers {args.hf_dtype}  threads {args.threads}")
    print(f"{'metric':<18}{'ours':>12}{'transformers':>14}{'ratio':>8}")
    for k in ours:
        print(f"{k:<18}{ours[k]:>12.1f}{theirs[k]:>14.1f}{ours[k] / theirs[k]:>7.2f}x")
    print(f"batch-1 step {step_s * 1e3:.1f} ms; bound {bound_s * 1e3:.1f} ms "
          f"({weight_bytes / 1e6:.0f} MB weights at {bw:.1f} GB/s copy bandwidth)")
    print(f"engine resident memory (weights + KV pool + runtime): {rss_engine_mb:.0f} MiB")
    r16 = ours["decode_b16_tok_s"] / theirs["decode_b16_tok_s"]
    r1 = ours["decode_b1_tok_s"] / theirs["decode_b1_tok_s"]
    write_json(args.json, {"ours": ours, "transformers": theirs, "dtype": args.dtype, "hf_dtype": args.hf_dtype, "threads": args.threads,
                           "step_ms": step_s * 1e3, "bound_ms": bound_s * 1e3, "copy_gbs": bw,
                           "weight_bytes": weight_bytes, "roofline_pct": roofline,
                           "rss_engine_mib": rss_engine_mb, "ratio_b16": r16, "ratio_b1": r1})
    print(f"engine: batch16 decode {r16:.1f}x transformers, batch1 {r1:.1f}x, roofline {roofline:.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
