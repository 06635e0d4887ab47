"""The planner against static pools, on one load ramp (low -> high -> low).

The same schedule of requests (Poisson arrivals per phase, seeded; random prompts, so no
prefix-cache hits; `ignore_eos`, so every request generates `--osl` tokens) is replayed
against three deployments, each on a fresh tritonserver started by the launcher:

- `static-min`: `--min-decode` decode workers all along;
- `static-max`: `--max-decode` decode workers all along;
- `planner`: starts at the minimum, with the planner (`planner.loop.PlannerLoop` and the
  Triton connector, as `python -m planner` runs them) resizing the decode pool.

Per deployment: SLA attainment (the share of requests whose TTFT and mean ITL both met the
targets; a failed request misses), goodput (such requests per second), worker-seconds (the
integral of loaded decode workers over the replay, a loading or draining worker included)
and failed requests. Deployments run interleaved (min, max, planner, min, max, planner, ...
for `--repeats`) and the report gives medians. A PNG beside the JSON shows the offered
rate, the planner's replicas and every request's TTFT over time.

    python -m benchmarks.planner [--json PATH] [--png PATH] [--ramp 120:0.3,40:1.2,140:0.3]

Last line: `planner: SLA attainment {a}% vs {b}% static-max, {m}% static-min, at {c}% of
its worker-seconds, {f} failed`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from benchmarks.common import setup_logging, write_json
from benchmarks.plots import add_plot_flag
from planner.config import PlannerConfig
from planner.connectors.triton import TritonConnector
from planner.core.profile import Profile
from planner.loop import PlannerLoop
from planner.metrics import scrape
from trident.core.names import scan_replicas
from trident.launcher import REPO_ROOT, Launcher
from trident.model_control import ModelControl
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig

logger = logging.getLogger("benchmarks.planner")


@dataclass(slots=True)
class Outcome:
    sent: float  # seconds since the replay started
    ttft_s: float = 0.0
    itl_s: float = 0.0
    tokens: int = 0
    error: str = ""


def parse_ramp(spec: str) -> list[tuple[float, float]]:
    """`"120:0.3,40:1.2"` -> [(120 s, 0.3 req/s), (40 s, 1.2 req/s)]."""
    phases = []
    for part in spec.split(","):
        duration, rate = part.split(":")
        phases.append((float(duration), float(rate)))
    return phases


def arrivals(phases: list[tuple[float, float]], seed: int) -> list[float]:
    rng = random.Random(seed)
    out, start = [], 0.0
    for duration, rate in phases:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + duration:
                break
            out.append(t)
        start += duration
    return out


class Replay:
    """Sends the schedule open-loop: each request at its time, on its own pool thread."""

    def __init__(self, grpc_url: str, args: argparse.Namespace) -> None:
        self.grpc_url = grpc_url
        self.args = args
        self._local = threading.local()

    def _client(self) -> RouterClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = RouterClient(self.grpc_url)
        return client

    def _one(self, outcome: Outcome, prompt: list[int], t0: float) -> Outcome:
        start = time.monotonic()
        first = last = 0.0
        try:
            for response in self._client().stream(input_ids=prompt, max_tokens=self.args.osl, ignore_eos=True,
                                                  stream=True, timeout=600):
                now = time.monotonic()
                first = first or now
                last = now
                outcome.tokens = int(response.get("num_output_tokens", outcome.tokens))
        except Exception as exc:  # counted as failed, reported
            outcome.error = str(exc)[:200]
            with contextlib.suppress(Exception):
                self._client().close()
            self._local.client = None
            return outcome
        outcome.ttft_s = first - start
        outcome.itl_s = (last - first) / (outcome.tokens - 1) if outcome.tokens > 1 else 0.0
        return outcome

    def run(self, times: list[float]) -> list[Outcome]:
        rng = random.Random(self.args.seed)
        prompts = [[rng.randrange(300, 40000) for _ in range(self.args.isl)] for _ in times]
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=128, thread_name_prefix="replay") as pool:
            futures = []
            for at, prompt in zip(times, prompts, strict=True):
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                futures.append(pool.submit(self._one, Outcome(at), prompt, t0))
            results = [f.result() for f in futures]
            for _ in range(pool._max_workers):  # close each pool thread's client
                pool.submit(self._close_client)
        return results

    def _close_client(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
            self._local.client = None


class WorkerClock:
    """Integrates loaded decode workers over time (probing readiness every `every_s`); a
    replica being loaded counts from the moment the connector starts loading it."""

    def __init__(self, control: ModelControl, every_s: float = 0.5) -> None:
        self.control = control
        self.every_s = every_s
        self.loading = 0  # set by the wrapped connector while a scale-up runs
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-clock")

    def count(self) -> int:
        return max(len(scan_replicas("decode", self.control.is_ready)), self.loading)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.count()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> WorkerClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.count()))

    def worker_seconds(self, start: float, end: float) -> float:
        """Integral of the sampled count over [start, end] (seconds on the clock's scale),
        each sample holding until the next one."""
        total = 0.0
        for (t0, n), (t1, _) in zip(self.samples, self.samples[1:], strict=False):
            lo, hi = max(t0, start), min(t1, end)
            if hi > lo:
                total += n * (hi - lo)
        return total


@contextlib.contextmanager
def deployment(args: argparse.Namespace, decode: int, tmp: str) -> Iterator[Launcher]:
    config = ServeConfig(
        http_port=0, grpc_port=0, metrics_port=0, decode=decode, kv_cache_mb=args.kv_cache_mb,
        num_threads=1, log_level="warning", server_log=os.path.join(tmp, f"tritonserver-{decode}-{time.time():.0f}.log"),
    )
    launcher = Launcher(config, progress=logger.info)
    launcher.start()
    try:
        warm = Replay(launcher.endpoints.grpc_url, replace_args(args, osl=4, seed=args.seed + 10_000))  # type: ignore[union-attr]
        warm.run([0.0, 0.1, 0.2])
        yield launcher
    finally:
        launcher.stop()


def replace_args(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def planner_config(args: argparse.Namespace) -> PlannerConfig:
    return PlannerConfig(
        mode=args.mode, profile=args.profile, ttft_target_ms=args.ttft_ms, itl_target_ms=args.itl_ms,
        headroom=args.headroom, interval_s=args.interval_s, scrape_s=1.0, min_decode=args.min_decode,
        max_decode=args.max_decode, budget=float(args.max_decode), up_cooldown_s=args.up_cooldown_s,
        down_cooldown_s=args.down_cooldown_s, down_windows=args.down_windows,
    ).validate()


def run_one(args: argparse.Namespace, kind: str, times: list[float], tmp: str) -> dict[str, object]:
    decode = args.max_decode if kind == "static-max" else args.min_decode
    with deployment(args, decode, tmp) as launcher:
        ep = launcher.endpoints
        assert ep is not None and launcher.kv_events_dir is not None
        control = ModelControl(ep.http_url, launcher.key)
        loop = stop = thread = None
        with WorkerClock(control) as clock:
            if kind == "planner":
                loop, stop, thread = start_planner(args, launcher, control, clock)
            load_before = os.getloadavg()[0]
            started = time.monotonic()
            outcomes = Replay(ep.grpc_url, args).run(times)
            ended = time.monotonic()
            elapsed = ended - started
            if stop is not None:
                stop.set()
                thread.join(timeout=600)  # type: ignore[union-attr]
        result = summarize(args, kind, outcomes, elapsed, clock.worker_seconds(started, ended))
        result["replicas"] = [(t - started, n) for t, n in clock.samples]
        result["load_average_1m"] = [load_before, os.getloadavg()[0]]
        if loop is not None:
            result["decisions"] = [
                {"t": r.t - started, "replicas": dict(r.replicas), "targets": dict(r.decision.targets),
                 "reasons": dict(r.decision.reasons)} for r in loop.records
            ]
        logger.warning(
            "%-10s attainment %5.1f%%  goodput %.2f/s  worker-s %6.0f  failed %d  ttft p50/p90 %.2f/%.2f s  (load %.1f)",
            kind, result["attainment_pct"], result["goodput_rps"], result["worker_seconds"], result["failed"],
            result["ttft_p50_s"], result["ttft_p90_s"], load_before,
        )
        return result


def start_planner(args: argparse.Namespace, launcher: Launcher, control: ModelControl, clock: WorkerClock):  # noqa: ANN201
    ep = launcher.endpoints
    assert ep is not None and launcher.kv_events_dir is not None
    connector = TritonConnector(control, launcher.repository, launcher.kv_events_dir,
                                lambda: scrape(ep.metrics_url, 0.0), root=str(REPO_ROOT))
    scale = connector.scale

    def counted_scale(pool: str, target: int) -> None:
        clock.loading = target if target > len(connector.replicas()[pool]) else 0
        try:
            scale(pool, target)
        finally:
            clock.loading = 0

    connector.scale = counted_scale  # type: ignore[method-assign]
    profile = Profile.load(args.profile) if args.profile else None
    loop = PlannerLoop(planner_config(args), connector, lambda t: scrape(ep.metrics_url, t),
                       budget=float(args.max_decode), profile=profile)
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True, name="planner")
    thread.start()
    return loop, stop, thread


def summarize(args: argparse.Namespace, kind: str, outcomes: list[Outcome], elapsed: float, measured_ws: float) -> dict:
    ttft_target, itl_target = args.ttft_ms / 1e3, args.itl_ms / 1e3
    ok = [o for o in outcomes if not o.error]
    good = [o for o in ok if o.ttft_s <= ttft_target and o.itl_s <= itl_target]
    ttfts = sorted(o.ttft_s for o in ok) or [0.0]
    worker_s = measured_ws if kind == "planner" else elapsed * (
        args.max_decode if kind == "static-max" else args.min_decode)
    return {
        "kind": kind,
        "requests": len(outcomes),
        "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "attainment_pct": 100.0 * len(good) / max(len(outcomes), 1),
        "goodput_rps": len(good) / elapsed,
        "worker_seconds": worker_s,
        "duration_s": elapsed,
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)],
        "itl_p50_s": statistics.median([o.itl_s for o in ok]) if ok else 0.0,
        "requests_detail": [asdict(o) for o in outcomes],
    }


def draw(path: str, runs: list[dict], phases: list[tuple[float, float]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    t, xs, ys = 0.0, [], []
    for duration, rate in phases:
        xs += [t, t + duration]
        ys += [rate, rate]
        t += duration
    top.plot(xs, ys, color="gray", label="offered req/s")
    top.set_ylabel("req/s")
    twin = top.twinx()
    colors = {"static-min": "tab:red", "static-max": "tab:green", "planner": "tab:blue"}
    for run in runs:
        if run["kind"] == "planner":
            samples = run["replicas"]
            twin.step([s[0] for s in samples], [s[1] for s in samples], where="post", color="tab:blue", alpha=0.6)
    twin.set_ylabel("planner's decode workers")
    twin.set_ylim(0, args.max_decode + 0.5)
    top.legend(loc="upper left")
    for run in runs:
        detail = [r for r in run["requests_detail"] if not r["error"]]
        bottom.scatter([r["sent"] for r in detail], [r["ttft_s"] for r in detail], s=4,
                       color=colors[run["kind"]], alpha=0.5, label=run["kind"])
    bottom.axhline(args.ttft_ms / 1e3, color="black", linestyle="--", linewidth=0.8, label="TTFT target")
    bottom.set_yscale("log")
    bottom.set_ylabel("TTFT (s)")
    bottom.set_xlabel("seconds into the ramp")
    handles, labels = bottom.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    bottom.legend(unique.values(), unique.keys(), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ramp", default="120:0.3,40:1.2,140:0.3", help="phases, seconds:req/s, comma-separated")
    ap.add_argument("--isl", type=int, default=384, help="prompt tokens per request")
    ap.add_argument("--osl", type=int, default=16, help="generated tokens per request")
    ap.add_argument("--ttft-ms", type=float, default=2000.0)
    ap.add_argument("--itl-ms", type=float, default=250.0)
    ap.add_argument("--min-decode", type=int, default=1)
    ap.add_argument("--max-decode", type=int, default=2)
    ap.add_argument("--mode", default="load", choices=("load", "sla"))
    ap.add_argument("--profile", default="", help="profile JSON (python -m planner.profile) for --mode sla")
    ap.add_argument("--headroom", type=float, default=0.8)
    ap.add_argument("--interval-s", type=float, default=5.0)
    ap.add_argument("--up-cooldown-s", type=float, default=10.0)
    ap.add_argument("--down-cooldown-s", type=float, default=10.0)
    ap.add_argument("--down-windows", type=int, default=2)
    ap.add_argument("--kv-cache-mb", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kinds", default="static-min,static-max,planner")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    add_plot_flag(ap)
    ap.add_argument("--png", default="", help="figure path ('' = beside --json, else planner.png)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("benchmarks.planner").setLevel(logging.INFO if args.verbose else logging.WARNING)
    phases = parse_ramp(args.ramp)
    times = arrivals(phases, args.seed)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="trident-bench-planner-") as tmp:
        for repeat in range(args.repeats):
            for kind in kinds:  # interleaved: min, max, planner, min, max, planner, ...
                run = run_one(args, kind, times, tmp)
                run["repeat"] = repeat
                runs.append(run)
    med = {k: {m: statistics.median(r[m] for r in runs if r["kind"] == k)
               for m in ("attainment_pct", "goodput_rps", "worker_seconds", "failed")} for k in kinds}
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else "planner.png")
    draw(png, runs, phases, args)
    write_json(args.json, {
        "benchmark": "planner", "ramp": phases, "requests": len(times), "args": vars(args),
        "cpu_count": os.cpu_count(), "medians": med, "runs": runs, "png": png,
    }, plot=args.plot, name="planner")
    if {"planner", "static-max", "static-min"} <= set(med):
        p, hi, lo = med["planner"], med["static-max"], med["static-min"]
        share = 100.0 * p["worker_seconds"] / max(hi["worker_seconds"], 1e-9)
        print(f"planner: SLA attainment {p['attainment_pct']:.1f}% vs {hi['attainment_pct']:.1f}% static-max, "
              f"{lo['attainment_pct']:.1f}% static-min, at {share:.0f}% of its worker-seconds, "
              f"{int(p['failed'])} failed", flush=True)
    else:
        print("planner: " + ", ".join(f"{k} {v['attainment_pct']:.1f}%" for k, v in med.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
