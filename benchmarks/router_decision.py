"""KV-aware routing decision time for a 4K-token prompt across 4 workers.

The router (`KvRouter`, policy `kv`, blocks of 16 tokens) starts with a realistic index: each
worker holds `--background-blocks` blocks of unrelated prompts plus a random half of 32 shared
2K-token "system prompts" (as KV events would have stored them), and a load report each.
Every request is one of the system prompts followed by 2K fresh user tokens, so the index
finds a cached prefix on some workers and none on others; each request is released right
after its decision (as the orchestrator does when a request ends), so cache affinity rather
than pending load drives the choice. One decision = hashing the 256 blocks + index lookup +
the policy's choice + recording the assignment, timed around the `decide` call: wall time
(what a request waits; on a shared machine it includes time other processes took the CPU)
and this thread's CPU time (what the decision costs). The phases come from the decision's own
timers. Garbage collection stays on, as in the server.

    python -m benchmarks.router_decision [--iterations N] [--json PATH]

The last line is `router decision: p99 X ms for 4096 tokens, 4 workers`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time

from kv_manager.events import BlockStored
from kv_manager.hashing import hash_blocks
from kv_manager.wire import LoadReport
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.router import KvRouter
from trident.core.names import replica_names
from trident.core.stats import percentile


def build_router(args: argparse.Namespace, rng: random.Random) -> tuple[KvRouter, list[list[int]]]:
    config = RoutingConfig(
        policy=args.policy,
        block_size=args.block_size,
        kv_events=not args.approximate,
        seed=0,
    )
    router = KvRouter(config)
    workers = replica_names("decode", args.workers)
    system_prompts = [[rng.randrange(49152) for _ in range(args.tokens // 2)] for _ in range(32)]
    for worker in workers:
        router.add_worker(worker)
        router.update_load(
            worker, LoadReport(worker, "bench", time.time(), rng.randrange(200), 4096, 4, 0, 0)
        )
        background = [rng.getrandbits(64) for _ in range(args.background_blocks)]
        router.apply_events(worker, [BlockStored(tuple(background), None, (), args.block_size)])
        for prompt in rng.sample(system_prompts, len(system_prompts) // 2):
            hashes = hash_blocks(prompt, args.block_size)
            router.apply_events(worker, [BlockStored(tuple(hashes), None, (), args.block_size)])
    return router, system_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--background-blocks", type=int, default=20_000)
    parser.add_argument("--policy", default="kv")
    parser.add_argument("--approximate", action="store_true", help="no KV events: TTL mode")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = random.Random(0)
    router, system_prompts = build_router(args, rng)
    user_len = args.tokens - args.tokens // 2
    prompts = [
        rng.choice(system_prompts) + [rng.randrange(49152) for _ in range(user_len)]
        for _ in range(64)
    ]
    for i in range(args.warmup):
        router.decide(prompts[i % len(prompts)], request_id="warmup")
        router.release("warmup")

    wall_us: list[float] = []
    cpu_us: list[float] = []
    phases: dict[str, list[float]] = {"hashing": [], "lookup": [], "schedule": []}
    overlap = 0
    for i in range(args.iterations):
        prompt = prompts[i % len(prompts)]
        c0, t0 = time.thread_time_ns(), time.perf_counter()
        decision = router.decide(prompt, request_id="r")
        wall_us.append((time.perf_counter() - t0) * 1e6)
        cpu_us.append((time.thread_time_ns() - c0) / 1e3)
        router.release("r")
        phases["hashing"].append(decision.hashing_us)
        phases["lookup"].append(decision.lookup_us)
        phases["schedule"].append(decision.schedule_us)
        overlap += decision.overlap_blocks

    wall_us.sort()
    cpu_us.sort()
    result = {
        "benchmark": "router_decision",
        "tokens": args.tokens,
        "workers": args.workers,
        "block_size": args.block_size,
        "policy": args.policy,
        "approximate": args.approximate,
        "iterations": args.iterations,
        "index_hashes": router.index.num_blocks(),
        "mean_overlap_blocks": overlap / args.iterations,
        "decision_ms": {
            "p50": percentile(wall_us, 50) / 1e3,
            "p99": percentile(wall_us, 99) / 1e3,
            "max": wall_us[-1] / 1e3,
        },
        "decision_cpu_ms": {
            "p50": percentile(cpu_us, 50) / 1e3,
            "p99": percentile(cpu_us, 99) / 1e3,
        },
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "phase_us": {
            name: {"p50": percentile(sorted(v), 50), "p99": percentile(sorted(v), 99)}
            for name, v in phases.items()
        },
        "decisions_per_worker": dict(router.metrics.decisions),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for name, stats in result["phase_us"].items():
        print(f"{name:>9}: p50 {stats['p50']:8.1f} us   p99 {stats['p99']:8.1f} us")
    print(
        f"index: {result['index_hashes']} hashes; mean overlap {result['mean_overlap_blocks']:.1f} blocks"
    )
    print(f"decisions per worker: {result['decisions_per_worker']}")
    print(
        f"decision: p50 {result['decision_ms']['p50']:.3f} ms, max {result['decision_ms']['max']:.3f} ms"
        f" (wall); CPU p50 {result['decision_cpu_ms']['p50']:.3f} ms, p99"
        f" {result['decision_cpu_ms']['p99']:.3f} ms; load average {result['load_average_1m']:.2f}"
        f" on {result['cpus']} CPUs"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    p99 = result["decision_ms"]["p99"]
    print(f"router decision: p99 {p99:.3f} ms for {args.tokens} tokens, {args.workers} workers")


if __name__ == "__main__":
    main()
