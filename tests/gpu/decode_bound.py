"""GPU decode against its bound: the torch engine's decode steps with CUDA graphs on and off.

Usage: python tests/gpu/decode_bound.py [--json PATH] [--device cuda] [--new-tokens N] [--repeats R]

Builds two `TorchEngine`s on the device (the default SmolLM2 GGUF, dtype auto: bfloat16),
one with `cuda_graphs` on and one with it off, warms both up (the graphs are captured on
first use), then measures decode tokens/s and the mean step time at batch 1 and batch 16,
alternating on, off, on, off ... (`repeats` of each; medians). Each step time is set against
the bound of streaming the weights once per step, `model.weight_bytes() / bandwidth`, with
the device's read bandwidth measured by a sum over a 1 GiB tensor (CUDA events). It also
checks that both engines give the same greedy tokens at batch 16 (the first 8 must agree;
bf16 rounding may flip a later near-tie). The last line printed is the headline; exits 2
without a CUDA device, 1 if the greedy tokens disagree.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCHES = (1, 16)
AGREE = 8  # leading greedy tokens that must agree between the two engines

log = logging.getLogger("decode_bound")


def read_bandwidth_gbs(device, nbytes: int = 2**30, repeats: int = 5, inner: int = 10) -> float:
    """Bytes read per second by `torch.sum` over an `nbytes` tensor: best of `repeats`
    timings of `inner` sums each, timed with CUDA events."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / inner)
    del x
    return nbytes / best / 1e9


def greedy(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from trident.core.types import GenerateRequest, SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    q: queue.Queue = queue.Queue()
    out: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.submit(GenerateRequest(f"g{i}", tuple(p), sp), q.put)
    done = 0
    while done < len(prompts):
        chunk = q.get(timeout=300)
        out[chunk.request_id].extend(chunk.output_ids)
        done += chunk.finished
    return [out[f"g{i}"] for i in range(len(prompts))]


def measure(engines: dict, prompts: dict[int, list[list[int]]], new_tokens: int, repeats: int) -> dict:
    """Per batch and engine: tokens/s and step seconds of each repetition, alternated."""
    from benchmarks.engine_peers import engine_decode

    samples = {b: {k: {"tok_s": [], "step_s": []} for k in engines} for b in BATCHES}
    for b in BATCHES:  # warm-up: compiles nothing, but captures this batch's graphs
        for engine in engines.values():
            engine_decode(engine, prompts[b], new_tokens)
    for _ in range(repeats):
        for b in BATCHES:
            for kind, engine in engines.items():
                tok_s, step_s = engine_decode(engine, prompts[b], new_tokens)
                samples[b][kind]["tok_s"].append(tok_s)
                samples[b][kind]["step_s"].append(step_s)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="alternated repetitions per engine and batch")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        why = "not a CUDA device" if not args.device.startswith("cuda") else "torch.cuda.is_available() is False"
        print(f"decode_bound: needs a CUDA device ({args.device!r}: {why})", file=sys.stderr)
        return 2

    from benchmarks.common import write_json
    from benchmarks.engine_peers import make_prompts
    from plugins.torch_engine.config import TorchEngineConfig
    from plugins.torch_engine.engine import TorchEngine
    from router_ensemble.text.tokenizer import load_tokenizer

    device = torch.device(args.device)
    bandwidth = read_bandwidth_gbs(device)
    tok = load_tokenizer("")
    prompts = {b: make_prompts(tok, b, args.prompt_words) for b in BATCHES}
    engines = {
        kind: TorchEngine(TorchEngineConfig(device=args.device, cuda_graphs=kind == "graphs", worker_id=kind))
        for kind in ("graphs", "eager")
    }
    try:
        for engine in engines.values():
            engine.start()
        model = engines["graphs"].runner.model
        bound_s = model.weight_bytes() / (bandwidth * 1e9)
        samples = measure(engines, prompts, args.new_tokens, args.repeats)
        tokens = {kind: greedy(engine, prompts[16], 32) for kind, engine in engines.items()}
        graphs = engines["graphs"].runner.graphs
        captured = graphs.captured if graphs is not None else []
    finally:
        for engine in engines.values():
            engine.shutdown()

    agree = sum(a[:AGREE] == b[:AGREE] for a, b in zip(tokens["graphs"], tokens["eager"], strict=True))
    same = sum(a == b for a, b in zip(tokens["graphs"], tokens["eager"], strict=True))
    results: dict = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(model.dtype).removeprefix("torch."),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "read_bandwidth_gbs": bandwidth,
        "weight_bytes": model.weight_bytes(),
        "bound_step_us": bound_s * 1e6,
        "graphs_captured": [list(k) for k in captured],
        "greedy_first_tokens_agree": f"{agree}/{len(tokens['graphs'])}",
        "greedy_all_tokens_agree": f"{same}/{len(tokens['graphs'])}",
        "batches": {},
    }
    print(f"{results['device']}: read {bandwidth:.0f} GB/s, weights {model.weight_bytes() / 2**20:.0f} MiB "
          f"({results['dtype']}), bound {bound_s * 1e6:.0f} us/step; {len(captured)} graphs captured")
    for b in BATCHES:
        row: dict = {}
        for kind in engines:
            s = samples[b][kind]
            step = statistics.median(s["step_s"])
            row[kind] = {"tok_s": statistics.median(s["tok_s"]), "step_us": step * 1e6, "x_bound": step / bound_s,
                         "samples_tok_s": s["tok_s"], "samples_step_s": s["step_s"]}
            print(f"batch {b:>2} {kind:<6}: {row[kind]['tok_s']:8.0f} tok/s, step {step * 1e6:7.0f} us "
                  f"= {step / bound_s:5.1f}x its bound")
        row["graphs_speedup"] = row["eager"]["step_us"] / row["graphs"]["step_us"]
        results["batches"][str(b)] = row
    r = results["batches"]
    results["headline"] = (
        f"gpu decode: graphs b1 {r['1']['graphs_speedup']:.2f}x eager, b16 {r['16']['graphs_speedup']:.2f}x; "
        f"b1 step {r['1']['graphs']['x_bound']:.1f}x its bound; greedy tokens agree {agree}/{len(tokens['graphs'])}"
    )
    write_json(args.json or None, results)
    if agree < len(tokens["graphs"]):
        bad = len(tokens["graphs"]) - agree
        log.error("graphs and eager disagree within the first %d greedy tokens on %d prompts", AGREE, bad)
    print(results["headline"])
    return 0 if agree == len(tokens["graphs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
