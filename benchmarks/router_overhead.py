"""Latency the `router` model adds over calling the decode worker directly.

Starts tritonserver through Trident's launcher (or uses `--grpc-url`), then sends the same
prompt, alternately, to `router` (text in, streamed text deltas out: tokenize, route, BLS,
detokenize, stop-string check) and straight to `decode` (the same token ids in, token ids
out), greedy with a fixed number of new tokens so both do identical engine work. Requests
are sequential and interleaved in pairs (alternating which goes first) so slow drifts of the
machine hit both sides alike; the overhead of a pair is router latency minus direct latency.

`--engine tiny` serves a 2-layer random Llama with SmolLM2's vocabulary and tokenizer instead
of SmolLM2 itself: the router does the same work (tokenize, route, BLS, detokenize, the same
ids and text), but a forward pass costs about a millisecond instead of ~90 ms, so the
run-to-run spread of the engine (tens of ms on a shared 2-core CPU) no longer swamps the
few milliseconds the router adds. `--engine default` measures the real model.

    python -m benchmarks.router_overhead [--engine tiny] [--requests 100] [--max-tokens 4] [--json PATH]

Last line: `router overhead: p50 {a} ms, p99 {b} ms`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from benchmarks.common import setup_logging, write_json
from benchmarks.plots import add_plot_flag
from router_ensemble.text.tokenizer import load_tokenizer
from trident.core.stats import percentile
from trident.launcher import Launcher
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

PROMPT = "The capital of France is"  # greedy output starts with text at once (" Paris")


def timed(client: RouterClient, **inputs: Any) -> tuple[float, float, int]:
    """(total seconds, seconds to the first response, tokens) of one streamed request."""
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    for response in client.stream(**inputs):
        if not first:
            first = time.perf_counter() - start
        tokens += len(response.get("output_ids", []))
    return time.perf_counter() - start, first, tokens


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    if args.grpc_url:
        yield args.grpc_url
        return
    with tempfile.TemporaryDirectory(prefix="trident-bench-") as tmp:
        model = tiny_model(f"{tmp}/tiny") if args.engine == "tiny" else ""
        config = ServeConfig(
            model=model, http_port=0, grpc_port=0, metrics_port=0, decode=1, kv_cache_mb=args.kv_cache_mb,
            num_threads=args.num_threads, log_level="warning", server_log=f"{tmp}/tritonserver.log",
            dtype="float32" if model else "",
        )
        with Launcher(config) as launcher:
            assert launcher.endpoints is not None
            yield launcher.endpoints.grpc_url


def tiny_model(path: str) -> str:
    """A random 2-layer Llama with the default model's vocabulary, plus its tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save(path)
    return path


def summarize(values: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    return {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99), "mean": sum(ms) / len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("tiny", "default"), default="tiny",
                        help="tiny: a near-free engine, so the difference is the router's; default: SmolLM2")
    parser.add_argument("--requests", type=int, default=100, help="measured pairs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads of the decode worker")
    parser.add_argument("--kv-cache-mb", type=int, default=64)
    parser.add_argument("--grpc-url", default="", help="use a running server instead of starting one")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    add_plot_flag(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    ids = load_tokenizer("").encode(args.prompt, add_special_tokens=True)
    common = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
    routed = {"text_input": args.prompt, "stream": True, **common}
    direct = {"input_ids": ids, **common}
    load_before = os.getloadavg()
    results: dict[str, list[float]] = {"router": [], "direct": [], "router_ttft": [], "direct_ttft": [], "overhead": []}
    with server(args) as grpc_url, RouterClient(grpc_url) as router, RouterClient(grpc_url, model="decode") as worker:
        for i in range(args.warmup + args.requests):
            order = [("router", router, routed), ("direct", worker, direct)]
            if i % 2:
                order.reverse()
            sample: dict[str, tuple[float, float, int]] = {name: timed(client, **inputs) for name, client, inputs in order}
            if sample["router"][2] != sample["direct"][2]:
                raise SystemExit(f"token counts differ: {sample}")
            if i < args.warmup:
                continue
            for name in ("router", "direct"):
                results[name].append(sample[name][0])
                results[f"{name}_ttft"].append(sample[name][1])
            results["overhead"].append(sample["router"][0] - sample["direct"][0])

    load_after = os.getloadavg()
    stats = {name: summarize(values) for name, values in results.items()}
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores)")
    for name, s in stats.items():
        print(f"{name:>12}: p50 {s['p50']:8.2f} ms   p90 {s['p90']:8.2f} ms   p99 {s['p99']:8.2f} ms")
    write_json(args.json, {
        "benchmark": "router_overhead", "engine": args.engine, "requests": args.requests, "max_tokens": args.max_tokens,
        "prompt_tokens": len(ids), "num_threads": args.num_threads, "stats_ms": stats,
        "load_average": {"before": load_before, "after": load_after},
    }, plot=args.plot, name="router_overhead")
    over = stats["overhead"]
    print(f"router overhead: p50 {over['p50']:.2f} ms, p99 {over['p99']:.2f} ms")


if __name__ == "__main__":
    main()
