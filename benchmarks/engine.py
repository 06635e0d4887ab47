"""Our torch engine vs vLLM's CPU build vs Hugging Face transformers, same model and prompts.

    taskset -c 0 python -m benchmarks.engine [--threads 1] [--repeats 3] [--peers torch,vllm,transformers]
                                             [--dtype auto|bfloat16|float32] [--json PATH]
    python -m benchmarks.engine --threads 2 --peers torch,torch@1,vllm,vllm@1

Measures decode tokens/s at batch 1 and 16 and prefill tokens/s for each peer, and our
batch-1 decode step against the memory-bandwidth bound (weight bytes read per step / the
measured read bandwidth). Peer "torch-aten" is our engine on PyTorch's own kernels
(`cpu_kernels` off), to compare ours against. A peer named `kind@N` runs with N threads
instead of --threads, in the same interleaved run: `torch@1` beside `torch` gives our
thread scaling (on the last line). `--dtype auto` (the default) is the engine's
choice for this CPU, given to vLLM too: bfloat16 where the CPU has bf16 instructions, else
float32. Every peer runs in a process of its own (`benchmarks.engine_peers`), built
once, on the cores this process may use (pin them with `taskset`), and the repetitions are
interleaved: torch, vllm, transformers, torch, vllm, ... Reported: medians, with the spread
(min-max) beside them, and the load average before, when measuring starts (the peers' own
start-up, vLLM's compilation, shows there) and after; a run that began with the cores already
busy (1-minute load above --max-load before any peer started) is flagged, its ratios are not
to be trusted. vLLM runs through our engine plugin (`plugins.vllm`), compiled (its default) unless
--vllm-eager; transformers in float32 (its fastest dtype for this GGUF) unless --hf-dtype.
Last line: `engine: batch16 decode {x}x transformers, batch1 {y}x, batch-1 step {z}x its bound,
vs vLLM batch16 {v}x, batch1 {w}x[, {n} threads vs 1 batch16 {s}x, batch1 {u}x]`.

With --structured, our engine alone: batch-16 decode with a JSON-schema grammar vs without
(`benchmarks.engine_structured`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics

from benchmarks.common import Peer, read_bandwidth_gbs, setup_logging, write_json
from benchmarks.engine_peers import PEERS, serve
from benchmarks.plots import add_plot_flag

METRICS = ("decode_b1_tok_s", "decode_b16_tok_s", "prefill_tok_s")


def measure_once(peer: Peer, new_tokens: int) -> dict[str, float]:
    b1, step = peer.ask("decode", batch=1, new_tokens=new_tokens)
    b16, _ = peer.ask("decode", batch=16, new_tokens=new_tokens)
    return {"decode_b1_tok_s": b1, "decode_b16_tok_s": b16, "prefill_tok_s": peer.ask("prefill"), "step_s": step}


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in runs[0]}


def resolved_dtype(name: str) -> str:
    import torch

    from plugins.torch_engine.setup import resolve_dtype

    return str(resolve_dtype(name, torch.device("cpu"))).removeprefix("torch.")


def peer_opts(name: str, opts: dict) -> dict:
    """The options of peer `name`: `kind@N` runs with N threads."""
    _, _, threads = name.partition("@")
    return {**opts, "threads": int(threads)} if threads else opts


def available_peers(requested: list[str]) -> list[str]:
    out = []
    for kind in requested:
        base, _, threads = kind.partition("@")
        if base not in PEERS or (threads and not threads.isdigit()):
            raise SystemExit(f"unknown peer {kind!r}: expected one of {PEERS}, optionally with @THREADS")
        if base == "vllm" and importlib.util.find_spec("vllm") is None:
            print("vllm: not installed (make setup-vllm); left out")
            continue
        out.append(kind)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="torch,vllm,transformers", help=f"comma-separated subset of {PEERS}")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="ours and vLLM")
    ap.add_argument("--hf-dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--prefill-words", type=int, default=180)
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--max-load", type=float, default=0.5, help="flag the run above this 1-minute load")
    ap.add_argument("--json", metavar="PATH")
    add_plot_flag(ap)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--structured", action="store_true",
                    help="ours only: batch-16 decode with a JSON-schema grammar vs without (benchmarks.engine_structured)")
    ap.add_argument("--device", default="cpu", help="--structured: the torch engine's device")
    args = ap.parse_args(argv)
    if args.structured:
        from benchmarks.engine_structured import run

        return run(args)
    setup_logging(args.verbose)
    kinds = available_peers([k.strip() for k in args.peers.split(",") if k.strip()])
    opts = {"threads": args.threads, "dtype": resolved_dtype(args.dtype), "hf_dtype": args.hf_dtype, "vllm_eager": args.vllm_eager,
            "prompt_words": args.prompt_words, "prefill_words": args.prefill_words}
    cores = sorted(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    peers = {k: Peer(k, peer_opts(k, opts), serve) for k in kinds}  # built one after another, measured interleaved
    try:
        load_start = os.getloadavg()
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind, peer in peers.items():
                runs[kind].append(measure_once(peer, args.new_tokens))
        infos = {k: p.info for k, p in peers.items()}
    finally:
        for peer in peers.values():
            peer.close()
    load_after = os.getloadavg()
    stats = {k: summarize(v) for k, v in runs.items()}
    report(args, cores, stats, infos, (load_before, load_start, load_after), runs)
    return 0


def ratio(stats, a: str, b: str, metric: str) -> float | None:
    if a not in stats or b not in stats:
        return None
    return stats[a][metric]["median"] / stats[b][metric]["median"]


def report(args, cores, stats, infos, loads, runs) -> None:
    busy = loads[0][0] > args.max_load  # before our peers started (building them loads the cores too)
    print(f"cores {cores}  threads {args.threads}  repeats {args.repeats} (interleaved)  "
          f"load avg before {loads[0][0]:.2f}, at start {loads[1][0]:.2f}, after {loads[2][0]:.2f}")
    if busy:
        print(f"WARNING: the 1-minute load was {loads[0][0]:.2f} > {args.max_load} before the run: "
              "the cores were shared, the ratios below are not trustworthy")
    print(f"{'metric':<18}" + "".join(f"{k + ' (' + infos[k]['dtype'] + ')':>32}" for k in stats))
    for m in METRICS:
        row = "".join(f"{s[m]['median']:>14.1f} [{s[m]['min']:>6.1f}-{s[m]['max']:>6.1f}]     " for s in stats.values())
        print(f"{m:<18}{row}")
    bound = None
    if "torch" in stats:
        import torch

        torch.set_num_threads(args.threads)
        bw = read_bandwidth_gbs()
        bound_s = infos["torch"]["weight_bytes"] / (bw * 1e9)
        step_s = stats["torch"]["step_s"]["min"]
        bound = step_s / bound_s
        print(f"ours batch-1 step {step_s * 1e3:.1f} ms (best of {args.repeats}) = {bound:.2f}x its bound "
              f"{bound_s * 1e3:.1f} ms ({infos['torch']['weight_bytes'] / 1e6:.0f} MB weights at {bw:.1f} GB/s read)")
    pairs = (("torch", "transformers"), ("torch", "vllm"), ("torch", "torch-aten"), ("torch", "torch@1"),
             ("vllm", "vllm@1"), ("torch@1", "vllm@1"))
    r = {f"{a}_vs_{b}_{m}": ratio(stats, a, b, m) for a, b in pairs
         for m in METRICS}
    write_json(args.json, {"stats": stats, "runs": runs, "infos": infos, "cores": cores, "threads": args.threads,
                           "loadavg": {"before": loads[0], "start": loads[1], "after": loads[2]},
                           "cores_shared": busy, "step_vs_bound": bound, "ratios": r}, plot=args.plot, name="engine")

    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}x"

    print(f"engine: batch16 decode {fmt(r['torch_vs_transformers_decode_b16_tok_s'])} transformers, "
          f"batch1 {fmt(r['torch_vs_transformers_decode_b1_tok_s'])}, "
          f"batch-1 step {'n/a' if bound is None else f'{bound:.2f}x'} its bound, "
          f"vs vLLM batch16 {fmt(r['torch_vs_vllm_decode_b16_tok_s'])}, batch1 {fmt(r['torch_vs_vllm_decode_b1_tok_s'])}"
          + ("" if r["torch_vs_torch@1_decode_b16_tok_s"] is None else
             f", {args.threads} threads vs 1 batch16 {fmt(r['torch_vs_torch@1_decode_b16_tok_s'])}, "
             f"batch1 {fmt(r['torch_vs_torch@1_decode_b1_tok_s'])}"))


if __name__ == "__main__":
    raise SystemExit(main())
