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

    python -m benchmarks.router_decision [--iterations N] [--no-dynamo] [--json PATH]

The peer, when `ai-dynamo-runtime` is installed (`make setup-peers`): Dynamo's own indexer
(its Rust radix tree and block hashing) holding the same blocks, asked about the same prompts,
interleaved with ours (A B, B A, ...); its hashing and its lookup (with the choice of the
longest overlap) are timed beside our hashing and our lookup plus schedule.

The last line is `router decision: p99 X ms for 4096 tokens, 4 workers` and, with the peer,
`; vs Dynamo indexer: hashing {a}x its speed, lookup {b}x` (Dynamo's p50 time over ours: above 1
we are faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time

from benchmarks.plots import add_plot_flag, write_plots
from kv_manager import hashing
from kv_manager.events import BlockStored
from kv_manager.hashing import hash_blocks
from kv_manager.wire import LoadReport
from router_ensemble.routing.config import RoutingConfig
from router_ensemble.routing.router import KvRouter
from trident.core.names import replica_names
from trident.core.stats import percentile


def build_index(args: argparse.Namespace, rng: random.Random) -> tuple[dict[str, tuple], list[list[int]]]:
    """What each worker holds: `(background hashes, cached system prompts)`, and the prompts."""
    workers = replica_names("decode", args.workers)
    system_prompts = [[rng.randrange(49152) for _ in range(args.tokens // 2)] for _ in range(32)]
    contents = {}
    for worker in workers:
        background = [rng.getrandbits(64) for _ in range(args.background_blocks)]
        contents[worker] = (background, rng.sample(system_prompts, len(system_prompts) // 2))
    return contents, system_prompts


def build_router(args: argparse.Namespace, rng: random.Random, contents: dict[str, tuple]) -> KvRouter:
    config = RoutingConfig(
        policy=args.policy,
        block_size=args.block_size,
        kv_events=not args.approximate,
        seed=0,
    )
    router = KvRouter(config)
    for worker, (background, prompts) in contents.items():
        router.add_worker(worker)
        router.update_load(
            worker, LoadReport(worker, "bench", time.time(), rng.randrange(200), 4096, 4, 0, 0)
        )
        router.apply_events(worker, [BlockStored(tuple(background), None, (), args.block_size)])
        for prompt in prompts:
            hashes = hash_blocks(prompt, args.block_size)
            router.apply_events(worker, [BlockStored(tuple(hashes), None, (), args.block_size)])
    return router


class DynamoIndexer:
    """Dynamo's own indexer (`ai-dynamo-runtime`: its Rust `RadixTree` and block hashing),
    holding what our router's index holds, fed with Dynamo's KV event format. A decision is
    its hashing (`compute_block_hash_for_seq`), its lookup (`find_matches`) and picking the
    worker with the longest overlap."""

    def __init__(self, args: argparse.Namespace, contents: dict[str, tuple]) -> None:
        import json

        from dynamo._core import RadixTree, compute_block_hash_for_seq

        self._hash = compute_block_hash_for_seq
        self.block_size = args.block_size
        self.tree = RadixTree()
        self.worker_ids = {i: w for i, w in enumerate(contents)}
        event_id = 0
        for i, (background, prompts) in enumerate(contents.values()):
            chains = [[(h, h) for h in background]]
            for prompt in prompts:
                local = compute_block_hash_for_seq(prompt, args.block_size)
                chains.append(list(zip(hash_blocks(prompt, args.block_size), local, strict=True)))
            for chain in chains:
                event_id += 1
                blocks = [{"block_hash": h, "tokens_hash": t} for h, t in chain]
                event = {"event_id": event_id, "data": {"stored": {"parent_hash": None, "blocks": blocks}}}
                self.tree.apply_event(i, json.dumps(event).encode())

    def decide(self, prompt: list[int]) -> tuple[str, float, float]:
        """(worker, hashing us, lookup + choice us)."""
        t0 = time.perf_counter()
        local = self._hash(prompt, self.block_size)
        t1 = time.perf_counter()
        scores = self.tree.find_matches(local).scores
        best = max(scores.items(), key=lambda kv: kv[1])[0][0] if scores else 0
        t2 = time.perf_counter()
        return self.worker_ids[best], (t1 - t0) * 1e6, (t2 - t1) * 1e6


def dynamo_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dynamo") is not None and importlib.util.find_spec("dynamo._core") is not None


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
    parser.add_argument("--no-dynamo", dest="dynamo", action="store_false",
                        help="skip the peer: Dynamo's own indexer (ai-dynamo-runtime, `make setup-peers`)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    add_plot_flag(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = random.Random(0)
    contents, system_prompts = build_index(args, rng)
    router = build_router(args, rng, contents)
    dynamo = DynamoIndexer(args, contents) if args.dynamo and dynamo_available() else None
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
    peer: dict[str, list[float]] = {"hashing": [], "lookup": [], "total": []}
    same_choice = 0
    if dynamo is not None:
        for i in range(args.warmup):
            dynamo.decide(prompts[i % len(prompts)])
    for i in range(args.iterations):
        prompt = prompts[i % len(prompts)]
        if dynamo is not None and i % 2:  # interleaved: ours first on even iterations, Dynamo's on odd
            peer_choice = _time_peer(dynamo, prompt, peer)
        c0, t0 = time.thread_time_ns(), time.perf_counter()
        decision = router.decide(prompt, request_id="r")
        wall_us.append((time.perf_counter() - t0) * 1e6)
        cpu_us.append((time.thread_time_ns() - c0) / 1e3)
        router.release("r")
        phases["hashing"].append(decision.hashing_us)
        phases["lookup"].append(decision.lookup_us)
        phases["schedule"].append(decision.schedule_us)
        overlap += decision.overlap_blocks
        if dynamo is not None and not i % 2:
            peer_choice = _time_peer(dynamo, prompt, peer)
        if dynamo is not None:
            same_choice += peer_choice == decision.worker_id

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
        # the C extensions (`make setup` builds them; without a compiler the Python paths run)
        "native": {"hashing": hashing.NATIVE, "index": router.index.native},
        "cpus": os.cpu_count(),
        "phase_us": {
            name: {"p50": percentile(sorted(v), 50), "p99": percentile(sorted(v), 99)}
            for name, v in phases.items()
        },
        "decisions_per_worker": dict(router.metrics.decisions),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    comparison = ""
    if dynamo is not None:
        result["dynamo_indexer_us"] = {k: {"p50": percentile(sorted(v), 50), "p99": percentile(sorted(v), 99)}
                                       for k, v in peer.items()}
        ours_lookup = [a + b for a, b in zip(phases["lookup"], phases["schedule"], strict=True)]
        result["ours_vs_dynamo_p50"] = {
            "hashing": percentile(sorted(peer["hashing"]), 50) / percentile(sorted(phases["hashing"]), 50),
            "lookup": percentile(sorted(peer["lookup"]), 50) / percentile(sorted(ours_lookup), 50),
        }
        result["same_worker_fraction"] = same_choice / args.iterations
        d = result["dynamo_indexer_us"]
        print(f"Dynamo indexer: hashing p50 {d['hashing']['p50']:8.1f} us, lookup+choice p50 {d['lookup']['p50']:8.1f} us"
              f" (ours: lookup+schedule p50 {percentile(sorted(ours_lookup), 50):8.1f} us); same worker chosen in"
              f" {100 * result['same_worker_fraction']:.0f}% of decisions (ours also weighs load)")
        r = result["ours_vs_dynamo_p50"]
        comparison = f"; vs Dynamo indexer: hashing {r['hashing']:.2f}x its speed, lookup {r['lookup']:.2f}x"
    for name, stats in result["phase_us"].items():
        print(f"{name:>9}: p50 {stats['p50']:8.1f} us   p99 {stats['p99']:8.1f} us")
    print(
        f"index: {result['index_hashes']} hashes; mean overlap {result['mean_overlap_blocks']:.1f} blocks;"
        f" C extensions: hashing {'on' if hashing.NATIVE else 'off'},"
        f" index {'on' if router.index.native else 'off'}"
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
    if args.plot:
        write_plots(args.json, result, "router_decision")
    p99 = result["decision_ms"]["p99"]
    print(f"router decision: p99 {p99:.3f} ms for {args.tokens} tokens, {args.workers} workers{comparison}")


def _time_peer(dynamo: DynamoIndexer, prompt: list[int], into: dict[str, list[float]]) -> str:
    t0 = time.perf_counter()
    worker, hashing_us, lookup_us = dynamo.decide(prompt)
    into["total"].append((time.perf_counter() - t0) * 1e6)
    into["hashing"].append(hashing_us)
    into["lookup"].append(lookup_us)
    return worker


if __name__ == "__main__":
    main()
