"""Decode throughput of our torch engine with a JSON-schema grammar vs without, same run.

    taskset -c 0 python -m benchmarks.engine --structured [--threads 1] [--repeats 3]
                                             [--new-tokens 48] [--dtype bfloat16|float32] [--json PATH]

One engine, batch 16, greedy, `ignore_eos`; each repetition runs A (unconstrained) then B
(every request under `SCHEMA`, whose shortest answer is longer than --new-tokens, so no
request ends early), interleaved A B A B ... Decode tokens/s are counted from the last
first token to the last token (as `benchmarks.engine` does); reported: medians with the
spread, the load average before, at start and after, and the compile time of the grammar
(once: later requests hit the engine's cache). Last line: `structured: batch16 decode
{x}x unconstrained ({b} vs {a} tok/s), grammar overhead {p}%`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from benchmarks.common import setup_logging, write_json
from benchmarks.engine_peers import make_prompts, run_batch

# An array of at least 40 records: far more tokens than a run generates.
SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string", "maxLength": 16},
            "kind": {"enum": ["animal", "plant", "mineral"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["id", "name", "kind", "tags"],
        "additionalProperties": False,
    },
}


def decode(engine, prompts: list[list[int]], new_tokens: int, spec: str | None) -> dict[str, float]:
    """One batch: decode tokens/s (last first token to last token) and how many ended early."""
    from trident.core.types import SamplingParams

    sp = SamplingParams(
        max_tokens=new_tokens, temperature=0, ignore_eos=True, structured_outputs=spec
    )
    run = run_batch(engine, prompts, sp, f"{'s' if spec else 'u'}-{time.monotonic_ns()}")
    span = max(run["ends"]) - max(run["firsts"].values())
    return {
        "decode_tok_s": sum(n - 1 for n in run["counts"].values()) / span,
        "ended_early": float(run["early"]),
    }


def run(args: argparse.Namespace) -> int:
    """`python -m benchmarks.engine --structured` (its parsed arguments)."""
    from plugins.torch_engine.config import TorchEngineConfig
    from plugins.torch_engine.engine import TorchEngine
    from plugins.torch_engine.grammar import Grammars
    from router_ensemble.text.tokenizer import load_tokenizer
    from trident.core.structured import structured_outputs_text

    setup_logging(args.verbose)
    cores = sorted(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    engine = TorchEngine(
        TorchEngineConfig(
            dtype=args.dtype,
            kv_cache_mb=192,
            enable_prefix_caching=False,
            max_num_batched_tokens=2048,
            num_threads=args.threads,
            device=args.device,
        )
    )
    engine.start()
    try:
        prompts = make_prompts(load_tokenizer(""), 16, args.prompt_words)
        spec = structured_outputs_text("json", SCHEMA)
        info = engine.info()
        t0 = time.perf_counter()  # what the engine's first constrained request pays (then cached)
        Grammars("", info.vocab_size, info.eos_token_ids).compile(spec)
        compile_s = time.perf_counter() - t0
        decode(engine, prompts, 8, None)  # warm-up, both paths
        decode(engine, prompts, 8, spec)
        load_start = os.getloadavg()
        runs: dict[str, list[dict[str, float]]] = {"unconstrained": [], "json_schema": []}
        for _ in range(args.repeats):
            runs["unconstrained"].append(decode(engine, prompts, args.new_tokens, None))
            runs["json_schema"].append(decode(engine, prompts, args.new_tokens, spec))
    finally:
        engine.shutdown()
    load_after = os.getloadavg()
    stats = {
        k: {
            m: {
                "median": statistics.median(r[m] for r in v),
                "min": min(r[m] for r in v),
                "max": max(r[m] for r in v),
            }
            for m in v[0]
        }
        for k, v in runs.items()
    }
    a = stats["unconstrained"]["decode_tok_s"]["median"]
    b = stats["json_schema"]["decode_tok_s"]["median"]
    busy = load_before[0] > args.max_load
    print(
        f"cores {cores}  threads {args.threads}  device {args.device}  dtype {args.dtype}  repeats {args.repeats} "
        f"(interleaved A B)  load avg before {load_before[0]:.2f}, at start {load_start[0]:.2f}, "
        f"after {load_after[0]:.2f}"
    )
    if busy:
        print(
            f"WARNING: the 1-minute load was {load_before[0]:.2f} > {args.max_load} before the run: "
            "the cores were shared, the ratio below is not trustworthy"
        )
    print(f"grammar compile (first request, cached after): {compile_s * 1e3:.0f} ms")
    for k, s in stats.items():
        d = s["decode_tok_s"]
        print(
            f"{k:<14} batch16 decode {d['median']:>8.1f} tok/s [{d['min']:.1f}-{d['max']:.1f}]  "
            f"ended early: {s['ended_early']['max']:.0f}"
        )
    write_json(
        args.json,
        {
            "stats": stats,
            "runs": runs,
            "cores": cores,
            "threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
            "compile_s": compile_s,
            "schema": SCHEMA,
            "loadavg": {"before": load_before, "start": load_start, "after": load_after},
            "cores_shared": busy,
            "ratio": b / a,
        },
        plot=getattr(args, "plot", False),
        name="engine_structured",
    )
    print(
        f"structured: batch16 decode {b / a:.2f}x unconstrained ({b:.1f} vs {a:.1f} tok/s), "
        f"grammar overhead {100 * (1 - b / a):.1f}%"
    )
    return 0
