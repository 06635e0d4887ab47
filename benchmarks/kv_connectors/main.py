"""Prefill -> decode handoff between two vLLM engines: our connector (`plugins.vllm.connector`,
shared memory, our descriptor and leases) against vLLM's own `NixlConnector` (NIXL's UCX
backend over DRAM), same engines, same cores, interleaved.

    make setup-peers   # once: NIXL for vLLM's connector
    python -m benchmarks.kv_connectors [--sizes 256,1024,1900] [--rounds 2] [--per-round 3]
                                       [--max-tokens 8] [--compiled] [--json PATH]

Two processes per connector (`benchmarks.kv_connectors.workers`): a prefill engine on core 0
and a decode engine on core 1, one core each, as one worker per core in serving. Only one
connector's pair is alive at a time: NIXL's processes keep a core busy while idle (UCX
progress; measured here, and reported as `idle_cpu`), which would slow whatever shares it.
So the interleaving is by round: each round starts one pair, does one unmeasured handoff
(NIXL's agent handshake), sends every prompt size `--per-round` times, measures the pair's
idle CPU over 3 s and stops it, then does the same with the other pair, the order alternating
from round to round (A B, B A, ...). Each round's prompts are fresh random ids, the same for
both connectors. Measured on the decode side: the handoff (request in -> its first token:
the KV copy or transfer plus one one-token step) and the whole decode; on the prefill side
its compute. Reported: medians (min-max), the load average before and after, and whether both
connectors' tokens agree. vLLM runs eager (no torch.compile; both sides alike) unless
--compiled.
Last line: `kv connector vs NIXL: handoff {x}x faster at {n} tokens ({a} vs {b} ms), TTFT {y}x lower`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

from benchmarks.common import Peer, setup_logging, write_json
from benchmarks.kv_connectors.workers import serve
from benchmarks.plots import add_plot_flag

CONNECTORS = ("trident", "nixl")
METRICS = ("prefill_s", "handoff_s", "decode_s", "ttft_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,1024,1900", help="prompt lengths in tokens")
    p.add_argument("--rounds", type=int, default=2, help="rounds of A B (then B A, ...)")
    p.add_argument("--per-round", type=int, default=3, help="handoffs per prompt size per round")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per request (the first is the prefill's)")
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--compiled", action="store_true", help="let vLLM torch.compile (minutes per engine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    add_plot_flag(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def start_pair(kind: str, args) -> tuple[Peer, Peer]:
    cores = sorted(os.sched_getaffinity(0))
    base = {"eager": not args.compiled, "kv_cache_mb": args.kv_cache_mb}
    prefill = Peer(kind, {**base, "role": "prefill", "core": cores[0], "side_channel_port": 25600}, serve)
    try:
        decode = Peer(kind, {**base, "role": "decode", "core": cores[1 % len(cores)], "side_channel_port": 25601}, serve)
    except BaseException:
        prefill.close()
        raise
    return prefill, decode


def idle_cpu(pair: tuple[Peer, Peer], seconds: float = 3.0) -> float:
    """CPU seconds per second the pair's processes use while nothing is asked of them."""
    def cpu(pid: int) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = [cpu(p.proc.pid) for p in pair]
    time.sleep(seconds)
    return sum(cpu(p.proc.pid) - b for p, b in zip(pair, before, strict=True)) / seconds


def handoff(pair: tuple[Peer, Peer], ids: list[int], max_tokens: int) -> tuple[dict[str, float], list[int]]:
    prefill, decode = pair
    first, handle, prefill_s = prefill.ask("prefill", ids=ids)
    tokens, handoff_s, decode_s = decode.ask("decode", ids=ids, first=first, handoff=handle, max_tokens=max_tokens)
    if prefill.kind == "nixl":
        prefill.ask("step_idle")  # the prefill side frees the blocks the decode side has read
    return {"prefill_s": prefill_s, "handoff_s": handoff_s, "decode_s": decode_s, "ttft_s": prefill_s + handoff_s}, tokens


def summarize(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {m: {"median": statistics.median(s[m] for s in samples), "min": min(s[m] for s in samples),
                "max": max(s[m] for s in samples)} for m in METRICS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    samples: dict[str, dict[int, list[dict[str, float]]]] = {k: {n: [] for n in sizes} for k in CONNECTORS}
    idle: dict[str, list[float]] = {k: [] for k in CONNECTORS}
    agree = True
    for rnd in range(args.rounds):
        prompts = {n: [[rng.randrange(300, 40000) for _ in range(n)] for _ in range(args.per_round)] for n in sizes}
        outputs: dict[str, list[list[int]]] = {}
        for kind in CONNECTORS if rnd % 2 == 0 else tuple(reversed(CONNECTORS)):
            pair = start_pair(kind, args)
            try:
                handoff(pair, [rng.randrange(300, 40000) for _ in range(64)], 2)  # NIXL handshake, warm caches
                outputs[kind] = []
                for n in sizes:
                    for ids in prompts[n]:  # fresh ids: no prefix-cache hit anywhere
                        sample, tokens = handoff(pair, ids, args.max_tokens)
                        samples[kind][n].append(sample)
                        outputs[kind].append(tokens)
                idle[kind].append(idle_cpu(pair))
            finally:
                for peer in pair:
                    peer.close()
        agree = agree and outputs["trident"] == outputs["nixl"]
    load_after = os.getloadavg()
    stats = {k: {n: summarize(samples[k][n]) for n in sizes} for k in CONNECTORS}
    report(args, sizes, stats, agree, idle, (load_before, load_after))
    return 0


def report(args, sizes, stats, agree: bool, idle: dict[str, list[float]], loads) -> None:
    def ms(x: float) -> str:
        return f"{x * 1000:.1f}"

    print(f"load average before {loads[0][0]:.2f}, after {loads[1][0]:.2f}"
          + ("  (busy before start: ratios not to be trusted)" if loads[0][0] > 0.5 else ""))
    print(f"{'tokens':>6} {'connector':>9} {'prefill ms':>18} {'handoff ms':>18} {'decode ms':>18} {'TTFT ms':>18}")
    ratios = {}
    for n in sizes:
        for kind in CONNECTORS:
            s = stats[kind][n]
            cells = [f"{ms(s[m]['median'])} ({ms(s[m]['min'])}-{ms(s[m]['max'])})" for m in METRICS]
            print(f"{n:>6} {kind:>9} " + " ".join(f"{c:>18}" for c in cells))
        ratios[n] = {m: stats["nixl"][n][m]["median"] / stats["trident"][n][m]["median"] for m in ("handoff_s", "ttft_s")}
    print(f"greedy tokens equal across connectors: {agree}")
    print("idle CPU of a prefill+decode pair (cores busy): "
          + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in idle.items()))
    write_json(args.json, {
        "benchmark": "kv_connectors", "args": vars(args), "time": time.time(), "stats": stats,
        "ratios_nixl_over_trident": ratios, "tokens_agree": agree, "idle_cpu": idle,
        "loadavg": {"before": loads[0], "after": loads[1]},
    }, plot=args.plot, name="kv_connectors")
    n = sizes[-1]
    print(f"kv connector vs NIXL: handoff {ratios[n]['handoff_s']:.2f}x faster at {n} tokens "
          f"({ms(stats['trident'][n]['handoff_s']['median'])} vs {ms(stats['nixl'][n]['handoff_s']['median'])} ms), "
          f"TTFT {ratios[n]['ttft_s']:.2f}x lower")
