"""Disaggregated vs aggregated serving under long prompts arriving while other requests decode.

Runs the same offered load against two servers started through Trident's launcher, each with
two engine workers of one torch thread each (one worker per core on a 2-core machine):

- aggregated: `--decode 2`, no prefill worker: a long prompt is prefilled (in chunks of 512
  tokens) by a decode worker, between the decode steps of the requests it is streaming;
- disaggregated: `--prefill 1 --decode 1`: prompts with at least `--threshold` tokens are
  prefilled by the prefill worker, and the decode worker only pulls their KV and decodes.

Load: `--background` closed-loop clients stream short prompts (`--short-tokens` random ids,
`--max-tokens` new tokens each, back to back), while a long prompt (`--long-tokens` random
ids, `--long-max-tokens` new tokens) arrives every `--long-every` seconds (open loop), for
`--duration` seconds. Prompts never share a prefix. The disaggregated router prefills locally
once `--prefill-max-inflight` long prompts wait for the prefill worker. Every request streams; inter-token
latency (ITL) is the gap between responses divided by the tokens they add, over every token
after a request's first; TTFT is the time to a request's first token.

    python -m benchmarks.disagg [--duration 60] [--json PATH]

Last line: `disagg: ITL p99 {a}x lower than aggregated, TTFT {b}x` with a = aggregated ITL p99 /
disaggregated ITL p99 and b = aggregated TTFT p99 / disaggregated TTFT p99 over all requests
(above 1: disaggregated is lower).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import setup_logging, write_json
from benchmarks.plots import add_plot_flag
from trident.core.stats import percentile
from trident.launcher import Launcher
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

INFLIGHT_ENV = "TRIDENT_ROUTER_PREFILL_MAX_INFLIGHT"
MODES = {  # name -> (prefill workers, decode workers)
    "aggregated": (0, 2),
    "disaggregated": (1, 1),
}


@dataclass(slots=True)
class Sample:
    kind: str  # "short" | "long"
    ttft: float = float("nan")
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    workers: str = ""
    error: str = ""
    start: float = 0.0  # perf_counter when it was sent
    itl_at: list[float] = field(default_factory=list)  # perf_counter of each ITL sample (plots)


def stream_one(client: RouterClient, kind: str, ids: list[int], max_tokens: int) -> Sample:
    sample = Sample(kind)
    start = last = sample.start = time.perf_counter()
    try:
        for response in client.stream(input_ids=ids, max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                                      stream=True, timeout=120):
            now = time.perf_counter()
            added = int(response["num_output_tokens"]) - sample.tokens
            if added <= 0:
                continue
            if sample.tokens == 0:
                sample.ttft = now - start
                sample.itls.extend([0.0] * (added - 1))
            else:
                sample.itls.extend([(now - last) / added] * added)
                sample.itl_at.extend([now] * added)
            sample.tokens += added
            sample.workers = response.get("worker", "")
            last = now
    except Exception as exc:  # counted and reported; the benchmark goes on
        sample.error = str(exc)
    if not sample.error and not sample.tokens:
        sample.error = "the stream ended without a token"
    return sample


class Load:
    """The offered load: identical for both modes (same seeds, same arrival times)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.samples: list[Sample] = []
        self._lock = threading.Lock()

    @staticmethod
    def prompt(rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(300, 40000) for _ in range(n)]

    def _record(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def _background(self, grpc_url: str, index: int, end: float) -> None:
        rng = random.Random(1000 + index)
        with RouterClient(grpc_url) as client:
            while time.monotonic() < end:
                self._record(stream_one(client, "short", self.prompt(rng, self.args.short_tokens), self.args.max_tokens))

    def _long(self, grpc_url: str, index: int) -> None:
        rng = random.Random(5000 + index)
        with RouterClient(grpc_url) as client:
            self._record(stream_one(client, "long", self.prompt(rng, self.args.long_tokens), self.args.long_max_tokens))

    def run(self, grpc_url: str) -> list[Sample]:
        a = self.args
        start = time.monotonic()
        end = start + a.duration
        threads = [threading.Thread(target=self._background, args=(grpc_url, i, end), daemon=True)
                   for i in range(a.background)]
        for t in threads:
            t.start()
        k = 0
        while True:
            at = start + a.long_every * (k + 0.5)
            if at >= end:
                break
            time.sleep(max(0.0, at - time.monotonic()))
            t = threading.Thread(target=self._long, args=(grpc_url, k), daemon=True)
            t.start()
            threads.append(t)
            k += 1
        for t in threads:
            t.join(timeout=600)
        return self.samples


@contextlib.contextmanager
def server(args: argparse.Namespace, prefill: int, decode: int, tmp: str) -> Iterator[str]:
    config = ServeConfig(
        http_port=0, grpc_port=0, metrics_port=0, decode=decode, prefill=prefill,
        disagg_threshold=args.threshold if prefill else 0, kv_cache_mb=args.kv_cache_mb,
        num_threads=1, dtype=args.dtype, log_level="warning", server_log=f"{tmp}/tritonserver-{prefill}p{decode}d.log",
    )
    previous = os.environ.get(INFLIGHT_ENV)
    os.environ[INFLIGHT_ENV] = str(args.prefill_max_inflight)  # the router reads it at start
    try:
        with Launcher(config) as launcher:
            assert launcher.endpoints is not None
            yield launcher.endpoints.grpc_url
    finally:
        if previous is None:
            os.environ.pop(INFLIGHT_ENV, None)
        else:
            os.environ[INFLIGHT_ENV] = previous


def warm_up(grpc_url: str, args: argparse.Namespace) -> None:
    """A few requests so that every worker has run once (the router's KV routing admits the
    workers as their first load reports arrive)."""
    rng = random.Random(7)
    deadline = time.monotonic() + 60
    with RouterClient(grpc_url) as client:
        while time.monotonic() < deadline:
            if not stream_one(client, "short", Load.prompt(rng, 8), 2).error:
                break
            time.sleep(0.5)
        for _ in range(4):
            stream_one(client, "short", Load.prompt(rng, args.short_tokens), 4)
        stream_one(client, "long", Load.prompt(rng, args.long_tokens), 2)


def ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000.0


def summarize(samples: list[Sample]) -> dict[str, Any]:
    ok = [s for s in samples if not s.error]
    itls = [x for s in ok for x in s.itls]
    out: dict[str, Any] = {
        "requests": len(samples), "errors": len(samples) - len(ok), "tokens": sum(s.tokens for s in ok),
        "itl_p50_ms": ms(itls, 50), "itl_p99_ms": ms(itls, 99),
        "ttft_p50_ms": ms([s.ttft for s in ok], 50), "ttft_p99_ms": ms([s.ttft for s in ok], 99),
        "workers": sorted({s.workers for s in ok}),
        "first_error": next((s.error for s in samples if s.error), ""),
    }
    t0 = min((s.start for s in ok), default=0.0)
    out["per_request"] = [  # for --plot: TTFT CDFs and ITL over time
        {"kind": s.kind, "ttft_s": round(s.ttft, 5),
         "itl_series": [[round(t - t0, 4), round(x * 1e3, 3)] for t, x in zip(s.itl_at, s.itls[-len(s.itl_at):] if s.itl_at else [], strict=True)]}
        for s in ok
    ]
    for kind in ("short", "long"):
        group = [s for s in ok if s.kind == kind]
        out[f"{kind}_requests"] = len(group)
        out[f"{kind}_ttft_p50_ms"] = ms([s.ttft for s in group], 50)
        out[f"{kind}_ttft_p99_ms"] = ms([s.ttft for s in group], 99)
        out[f"{kind}_itl_p99_ms"] = ms([x for s in group for x in s.itls], 99)
    return out


ROWS = [
    ("ITL p50 (ms)", "itl_p50_ms"), ("ITL p99 (ms)", "itl_p99_ms"),
    ("TTFT p50 (ms)", "ttft_p50_ms"), ("TTFT p99 (ms)", "ttft_p99_ms"),
    ("short: TTFT p50 (ms)", "short_ttft_p50_ms"), ("short: TTFT p99 (ms)", "short_ttft_p99_ms"),
    ("short: ITL p99 (ms)", "short_itl_p99_ms"),
    ("long: TTFT p50 (ms)", "long_ttft_p50_ms"), ("long: TTFT p99 (ms)", "long_ttft_p99_ms"),
    ("long: ITL p99 (ms)", "long_itl_p99_ms"),
    ("requests (short / long)", None), ("tokens generated", "tokens"), ("errors", "errors"),
]


def print_table(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    print(f"{'':26}" + "".join(f"{n:>16}" for n in names))
    for label, key in ROWS:
        cells = []
        for n in names:
            r = results[n]
            if key is None:
                cells.append(f"{r['short_requests']} / {r['long_requests']}")
            elif isinstance(r[key], float):
                cells.append(f"{r[key]:.1f}")
            else:
                cells.append(str(r[key]))
        print(f"{label:26}" + "".join(f"{c:>16}" for c in cells))
    for n in names:
        print(f"{n}: served by {', '.join(results[n]['workers'])}"
              + (f"; first error: {results[n]['first_error']}" if results[n]["first_error"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of offered load per mode")
    parser.add_argument("--background", type=int, default=4, help="closed-loop clients streaming short prompts")
    parser.add_argument("--short-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per short request")
    parser.add_argument("--long-every", type=float, default=6.0, help="seconds between long prompts")
    parser.add_argument("--long-tokens", type=int, default=1024)
    parser.add_argument("--long-max-tokens", type=int, default=16)
    parser.add_argument("--threshold", type=int, default=256, help="disagg_threshold of the disaggregated server")
    parser.add_argument("--prefill-max-inflight", type=int, default=2,
                        help="prefills in flight per prefill worker before the router prefills locally")
    parser.add_argument("--kv-cache-mb", type=int, default=128)
    parser.add_argument("--dtype", default="", help="engine dtype ('' = the model config's auto)")
    parser.add_argument("--modes", default="aggregated,disaggregated")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating the order (ABBA)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    add_plot_flag(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    modes = args.modes.split(",")
    samples: dict[str, list[Sample]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(prefix="trident-bench-") as tmp:
        for repeat in range(args.repeats):
            for name in modes if repeat % 2 == 0 else modes[::-1]:  # ABBA: drifts hit both alike
                prefill, decode = MODES[name]
                print(f"{name} ({repeat + 1}/{args.repeats}): {prefill} prefill + {decode} decode workers, "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
                with server(args, prefill, decode, tmp) as grpc_url:
                    warm_up(grpc_url, args)
                    samples[name].extend(Load(args).run(grpc_url))
    results = {name: summarize(samples[name]) for name in modes}
    print_table(results)
    write_json(args.json, {"benchmark": "disagg", "args": vars(args), "results": results}, plot=args.plot, name="disagg")
    if {"aggregated", "disaggregated"} <= set(results):
        agg, dis = results["aggregated"], results["disaggregated"]
        print(f"disagg: ITL p99 {agg['itl_p99_ms'] / dis['itl_p99_ms']:.2f}x lower than aggregated, "
              f"TTFT {agg['ttft_p99_ms'] / dis['ttft_p99_ms']:.2f}x")


if __name__ == "__main__":
    main()
