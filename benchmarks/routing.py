"""KV-aware routing against round-robin and random on a shared-prefix multi-user chat workload.

The workload: `--groups` groups of `--users` users; each group has its own system prompt of
about `--system-tokens` tokens, and each user asks `--questions` distinct questions of about
`--question-tokens` tokens (chat `messages`, so the router applies the chat template), each
answered with exactly `--answer-tokens` tokens (greedy, ignore_eos). Requests arrive in a
seeded random order as a Poisson process at `--rate` requests/s: the same schedule, prompts
and answers for every policy.

For each policy the real stack is started through Trident's launcher (`trident serve
--decode 3 --router-policy P`, one torch thread per worker) with a KV pool per worker that
holds about half of the groups' system prompts plus the running requests, so the cluster holds
them all and placement decides the hit rate. The kv policy runs with `--overlap-weight`
(default 2; the router's own default is Dynamo's 1.0): on these CPU engines prefill dominates
TTFT, so a cache hit is worth more than the KV memory it keeps busy, which is what the weight
says; at 1.0 the router spills a busy group to an idle worker more often.

Requests are streamed over gRPC; TTFT is the time to the first streamed response at the
client. The oracle hit rate is that of one worker with an unbounded prefix cache, replayed
offline over the same prompts in the same order with the engine's rules (chained block
hashes, full blocks, at least one prompt token computed). The engines run with a step budget
of `--step-tokens` (256; the engine's default is 512): a one-thread CPU worker takes about a
second per 512-token chunk, and a request whose prefix is cached should not wait a whole long
prefill chunk of another request before its own few tokens run. A run whose server fails is
repeated on a fresh one (`--attempts`); the JSON keeps the failed attempts' errors.

    python -m benchmarks.routing [--json PATH] [--policies kv,round_robin,random]

Last line: `routing: TTFT mean {x}x lower than round_robin, hit rate {h}% of oracle`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.common import setup_logging, write_json
from benchmarks.plots import add_plot_flag
from kv_manager.hashing import hash_blocks
from router_ensemble.text.tokenizer import Tokenizer, load_tokenizer
from trident.core.errors import TridentError
from trident.core.stats import percentile
from trident.launcher import Launcher
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

BLOCK_SIZE = 16  # the engine's default block size


@dataclass(frozen=True, slots=True)
class Request:
    group: int
    user: int
    messages: str  # chat JSON
    prompt_ids: tuple[int, ...]  # what the router will tokenize it to
    at: float  # seconds after the start


@dataclass(frozen=True, slots=True)
class Result:
    group: int
    ttft: float
    latency: float
    end: float
    worker: str
    prompt_tokens: int
    cached_tokens: int
    error: str = ""


def word_pool(tokenizer: Tokenizer) -> list[str]:
    """Plain lower-case words that are one token each (with their leading space)."""
    words = []
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.decode([token_id])
        if re.fullmatch(r" [a-z]{3,9}", text):
            words.append(text)
    return words


def text_of(rng: random.Random, words: list[str], tokenizer: Tokenizer, tokens: int) -> str:
    text = "".join(rng.choice(words) for _ in range(tokens)).strip()
    while len(tokenizer.encode(text)) > tokens:
        text = text.rsplit(" ", 1)[0]
    return text


def build_workload(args: argparse.Namespace, tokenizer: Tokenizer) -> list[Request]:
    rng = random.Random(args.seed)
    words = word_pool(tokenizer)
    systems = [
        f"You are assistant number {g}. " + text_of(rng, words, tokenizer, args.system_tokens)
        for g in range(args.groups)
    ]
    items = []
    for g in range(args.groups):
        for u in range(args.users):
            for _ in range(args.questions):
                question = text_of(rng, words, tokenizer, args.question_tokens) + "?"
                messages = [{"role": "system", "content": systems[g]}, {"role": "user", "content": question}]
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                items.append((g, u, json.dumps(messages), ids))
    rng.shuffle(items)
    gaps = [rng.expovariate(1.0) for _ in items[1:]]
    scale = (len(items) - 1) / args.rate / sum(gaps)  # Poisson arrivals at exactly `rate` on average
    t = 0.0
    requests = []
    for (g, u, messages, ids), gap in zip(items, [0.0, *gaps], strict=True):
        t += gap * scale
        requests.append(Request(g, u, messages, ids, t))
    return requests


def oracle_hit_rate(requests: list[Request]) -> float:
    """Hit rate of one worker with an unbounded prefix cache, requests served in order."""
    cached: set[int] = set()
    hit = total = 0
    for r in requests:
        hashes = hash_blocks(r.prompt_ids, BLOCK_SIZE)
        limit = (len(r.prompt_ids) - 1) // BLOCK_SIZE  # the engine computes >= 1 prompt token
        n = 0
        while n < min(limit, len(hashes)) and hashes[n] in cached:
            n += 1
        hit += n * BLOCK_SIZE
        total += len(r.prompt_ids)
        cached.update(hashes)
    return hit / total


def pool_blocks(args: argparse.Namespace, requests: list[Request]) -> int:
    """KV blocks per worker: half of the groups' shared prefixes plus the running requests."""
    by_group: dict[int, list[tuple[int, ...]]] = {}
    for r in requests:
        by_group.setdefault(r.group, []).append(r.prompt_ids)
    prefix_blocks = []
    for prompts in by_group.values():
        common = os.path.commonprefix([list(p) for p in prompts])
        prefix_blocks.append(len(common) // BLOCK_SIZE)
    private = max(-(-(len(r.prompt_ids) + args.answer_tokens) // BLOCK_SIZE) for r in requests)
    private -= min(prefix_blocks)
    half = -(-sum(prefix_blocks) // 2)
    return half + args.running_per_worker * private


def run_policy(args: argparse.Namespace, policy: str, requests: list[Request], num_blocks: int) -> dict[str, Any]:
    os.environ["TRIDENT_NUM_BLOCKS"] = str(num_blocks)  # the engines read it (TorchEngineConfig)
    os.environ["TRIDENT_MAX_NUM_BATCHED_TOKENS"] = str(args.step_tokens)
    os.environ["TRIDENT_ROUTER_OVERLAP_WEIGHT"] = str(args.overlap_weight)  # the router reads it (RoutingConfig)
    with tempfile.TemporaryDirectory(prefix="trident-routing-") as tmp:
        config = ServeConfig(
            http_port=0, grpc_port=0, metrics_port=0, decode=args.workers, num_threads=1,
            router_policy=policy, log_level="info" if args.server_log else "warning",
            server_log=f"{args.server_log}.{policy}" if args.server_log else f"{tmp}/tritonserver.log",
        )
        launcher = Launcher(config)
        try:
            ep = launcher.start()
            warm_up(ep.grpc_url, launcher.decode_models)
            time.sleep(1.0)  # the workers' first load reports and snapshots reach the router
            results, wall = replay(ep.grpc_url, requests, args)
            metrics = router_metrics(ep.metrics_url) if len(results) == len(requests) else {}
        finally:
            launcher.stop(grace_s=5.0)
    return summarize(policy, results, wall, metrics)


def run_policy_with_retries(args: argparse.Namespace, policy: str, requests: list[Request], num_blocks: int) -> dict[str, Any]:
    """A run whose server failed (errors, or requests never sent) is repeated on a fresh server,
    up to `--attempts` times; the failed attempts' errors are kept in the result."""
    failures: list[str] = []
    for _ in range(args.attempts):
        try:
            run = run_policy(args, policy, requests, num_blocks)
        except TridentError as exc:  # the server did not start
            run = summarize(policy, [], 0.0, {})
            run["errors"] = [str(exc).splitlines()[0]]
            run["requests"] = 0
        if not run["errors"] and run["requests"] == len(requests):
            break
        failures.append(f"{run['requests']} of {len(requests)} sent, errors: {run['errors'][:2]}")
        print(f"{policy:>12}: attempt failed ({failures[-1]}); retrying on a fresh server", flush=True)
    run["failed_attempts"] = failures
    return run


def warm_up(grpc_url: str, workers: list[str]) -> None:
    """One unrelated request per worker, straight to it, so first-call costs stay out; then one
    through the router, whose first request subscribes it to every worker's events."""
    ids = list(range(1000, 1000 + 200))
    for worker in workers:
        with RouterClient(grpc_url, model=worker) as client:
            client.generate(input_ids=ids, max_tokens=4, ignore_eos=True, temperature=0.0)
    with RouterClient(grpc_url) as client:
        client.generate(input_ids=ids, max_tokens=4, ignore_eos=True, temperature=0.0)


def replay(grpc_url: str, requests: list[Request], args: argparse.Namespace) -> tuple[list[Result], float]:
    local = threading.local()
    clients: list[RouterClient] = []
    lock = threading.Lock()

    def client() -> RouterClient:
        if not hasattr(local, "client"):
            local.client = RouterClient(grpc_url)
            with lock:
                clients.append(local.client)
        return local.client

    start = time.perf_counter()

    def one(r: Request) -> Result:
        sent = time.perf_counter()
        first = 0.0
        last: dict[str, Any] = {}
        try:
            for response in client().stream(
                messages=r.messages, max_tokens=args.answer_tokens, ignore_eos=True, temperature=0.0, stream=True,
                timeout=60.0,
            ):
                if not first and response.get("output_ids"):
                    first = time.perf_counter() - sent
                last = response
        except Exception as exc:  # counted and reported; the run goes on
            return Result(r.group, 0.0, 0.0, time.perf_counter() - start, "", len(r.prompt_ids), 0, str(exc))
        done = time.perf_counter()
        return Result(
            r.group, first, done - sent, done - start, str(last.get("worker", "")),
            int(last.get("num_input_tokens", 0)), int(last.get("cached_tokens", 0)),
        )

    futures = []
    with ThreadPoolExecutor(max_workers=args.max_in_flight) as pool:
        for r in requests:
            delay = start + r.at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if any(f.done() and f.result().error for f in futures):
                break  # the server failed; run_policy retries on a fresh one
            futures.append(pool.submit(one, r))
        results = [f.result() for f in futures]
    for c in clients:
        c.close()
    return results, max(r.end for r in results)


def router_metrics(metrics_url: str) -> dict[str, float]:
    """Mean decision time per phase (microseconds) from the router's /metrics."""
    text = httpx.get(metrics_url, timeout=10).text
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for kind, phase, value in re.findall(
        r'^trident_router_decision_seconds_(sum|count)\{phase="(\w+)"[^}]*\} (\S+)$', text, re.M
    ):
        (sums if kind == "sum" else counts)[phase] = float(value)
    return {f"decision_{p}_us_mean": sums[p] / counts[p] * 1e6 for p in sums if counts.get(p)}


def summarize(policy: str, results: list[Result], wall: float, metrics: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if not r.error]
    ttft = [r.ttft for r in ok]
    per_worker: dict[str, int] = {}
    for r in ok:
        per_worker[r.worker] = per_worker.get(r.worker, 0) + 1
    mean_load = sum(per_worker.values()) / max(1, len(per_worker))
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "policy": policy,
        "requests": len(results),
        "errors": [r.error for r in results if r.error][:5],
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else float("nan"),
        "ttft_p90_s": percentile(ttft, 90),
        "latency_mean_s": sum(r.latency for r in ok) / max(1, len(ok)),
        "throughput_rps": len(ok) / wall if wall else 0.0,
        "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "requests_per_worker": dict(sorted(per_worker.items())),
        "load_max_over_mean": max(per_worker.values()) / mean_load if per_worker else float("nan"),
        **metrics,
        "per_request": [[r.group, r.worker, round(r.ttft, 4), r.cached_tokens] for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--questions", type=int, default=4, help="questions per user")
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.6, help="offered load, requests/s")
    parser.add_argument("--workers", type=int, default=3, help="decode replicas")
    parser.add_argument(
        "--step-tokens", type=int, default=256,
        help="engine token budget per step (chunked prefill); smaller steps let a short prompt past a long one",
    )
    parser.add_argument("--running-per-worker", type=int, default=4, help="pool headroom, in requests")
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--attempts", type=int, default=3, help="fresh servers to try per policy if one fails")
    parser.add_argument(
        "--overlap-weight", type=float, default=2.0,
        help="kv policy's overlap weight (router default 1.0, Dynamo's); 2 suits prefill-bound CPU engines",
    )
    parser.add_argument("--policies", default="kv,round_robin,random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    add_plot_flag(parser)
    parser.add_argument("--server-log", metavar="PATH", help="keep tritonserver's info log in PATH.<policy>")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    tokenizer = load_tokenizer("")
    requests = build_workload(args, tokenizer)
    oracle = oracle_hit_rate(requests)
    num_blocks = pool_blocks(args, requests)
    mean_prompt = sum(len(r.prompt_ids) for r in requests) / len(requests)
    offered = (len(requests) - 1) / requests[-1].at  # the realised rate of the seeded schedule
    print(
        f"workload: {len(requests)} requests ({args.groups} groups x {args.users} users x {args.questions}), "
        f"prompts {mean_prompt:.0f} tokens, answers {args.answer_tokens}, {offered:.2f} req/s offered; "
        f"{args.workers} decode workers x {num_blocks} KV blocks; oracle hit rate {oracle:.1%}",
        flush=True,
    )
    runs = []
    for policy in args.policies.split(","):
        t0 = time.monotonic()
        run = run_policy_with_retries(args, policy.strip(), requests, num_blocks)
        runs.append(run)
        print(
            f"{run['policy']:>12}: TTFT mean {run['ttft_mean_s'] * 1e3:7.0f} ms  p90 {run['ttft_p90_s'] * 1e3:7.0f} ms  "
            f"{run['throughput_rps']:.2f} req/s  hit {run['hit_rate']:6.1%}  "
            f"load max/mean {run['load_max_over_mean']:.2f} {run['requests_per_worker']}  "
            f"errors {len(run['errors'])}  ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )
    by_policy = {r["policy"]: r for r in runs}
    write_json(args.json, {
        "benchmark": "routing", "workload": {**vars(args), "requests": len(requests), "mean_prompt_tokens": mean_prompt,
                                             "kv_blocks_per_worker": num_blocks, "offered_rps": offered},
        "oracle_hit_rate": oracle, "runs": runs,
    }, plot=args.plot, name="routing")
    kv, rr = by_policy.get("kv"), by_policy.get("round_robin")
    if kv and rr:
        ratio = rr["ttft_mean_s"] / kv["ttft_mean_s"]
        print(f"routing: TTFT mean {ratio:.1f}x lower than round_robin, hit rate {kv['hit_rate'] / oracle:.0%} of oracle")


if __name__ == "__main__":
    main()
