"""Multi-turn chat on one torch worker: device pool only vs + host tier vs + host + disk.

    taskset -c 0,1 python -m benchmarks.kv_tiers [--users 8] [--turns 6] [--rounds 2] [--json PATH]

Every user's turn adds `--turn-tokens` of new user text (random token ids, the same for every
configuration) to its history, which also keeps each reply (`--out-tokens`, greedy), and
sends the whole history; `--concurrency` requests are in flight, turn by turn across the
users. The device pool holds `--pool-fraction` of the mean live history of all users, so
most returning users find their history evicted from it. Configurations, in one process on
the same cores, interleaved round by round:

- `device`: the pool only (prefix caching on: what the engine does today);
- `host`: + a host-memory tier holding every history, write-through;
- `host_evict`: the same tier, offloaded on eviction instead;
- `host_disk`: a host tier holding half of them + a disk tier (admission by reuse);
- `host_disk_all`: the same, every block admitted to disk (`kv_disk_admit_after=1`).

Each reports TTFT mean/p90 (submit to first token), throughput and the tier counters. Then
the returning users: after the `--restart-config` run, every user sends one more turn, to the same
worker (never restarted) and to a restarted worker that has only its disk directory (a copy
taken before that turn; `--restart-config`). Last line: `kv tiers: TTFT mean {x}x lower than
device-only, host hit {h}%, after restart {r}x` (x: device over the restart configuration;
h: the host tier's share of the prompt blocks the pool missed, `host` run; r: restarted over
never-restarted TTFT mean).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from benchmarks.common import setup_logging, write_json
from benchmarks.plots import add_plot_flag
from plugins.torch_engine.config import TorchEngineConfig
from plugins.torch_engine.engine import TorchEngine
from trident.core.stats import percentile
from trident.core.types import GenerateRequest, SamplingParams

log = logging.getLogger("benchmarks.kv_tiers")
CONFIGS = ("device", "host", "host_evict", "host_disk", "host_disk_all")


@dataclass(slots=True)
class Run:
    config: str
    ttft_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    out_tokens: int = 0
    tiers: list[dict] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_tokens: int = 0

    def summary(self) -> dict:
        return {
            "config": self.config,
            "ttft_mean_s": statistics.fmean(self.ttft_s),
            "ttft_p90_s": percentile(self.ttft_s, 90),
            "turns_per_s": len(self.ttft_s) / self.wall_s,
            "out_tok_per_s": self.out_tokens / self.wall_s,
            "cached_fraction": self.cached_tokens / max(1, self.prompt_tokens),
            "tiers": self.tiers,
        }


class Chat:
    """The users' histories; the same schedule for every configuration."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.histories = [[] for _ in range(args.users)]

    def new_text(self, user: int, turn: int) -> list[int]:
        rng = random.Random(user * 1000 + turn)
        return [rng.randrange(100, 20000) for _ in range(self.args.turn_tokens)]


def engine_config(args: argparse.Namespace, config: str, disk_dir: str) -> TorchEngineConfig:
    block_nbytes = 30 * 2 * 16 * 3 * 64 * 4  # SmolLM2-135M, fp32, blocks of 16
    per_user = args.turns * (args.turn_tokens + args.out_tokens)
    mean_live = args.users * per_user * (args.turns + 1) / (2 * args.turns)
    # ... but never less than the running requests need (the last turn's prompts).
    num_blocks = max(int(args.pool_fraction * mean_live) // 16, args.concurrency * (per_user // 16 + 2))
    all_mb = args.users * (per_user // 16 + 2) * block_nbytes // 2**20 + 16
    base = {"dtype": "float32", "num_blocks": num_blocks, "num_threads": args.threads, "worker_id": "w0"}
    extra = {
        "device": {},
        "host": {"kv_host_mb": all_mb},
        "host_evict": {"kv_host_mb": all_mb, "kv_offload": "evict"},
        "host_disk": {"kv_host_mb": all_mb // 2, "kv_disk_gb": 2 * all_mb / 1024, "kv_disk_dir": disk_dir},
        "host_disk_all": {"kv_host_mb": all_mb // 2, "kv_disk_gb": 2 * all_mb / 1024, "kv_disk_dir": disk_dir,
                          "kv_disk_admit_after": 1},
    }[config]
    return TorchEngineConfig(**base, **extra)


def ask(engine: TorchEngine, rid: str, prompt: list[int], out_tokens: int) -> tuple[float, list[int], int]:
    """TTFT, the reply, the cached prompt tokens."""
    first, done = threading.Event(), threading.Event()
    chunks: list = []
    t0 = time.perf_counter()
    ttft = [0.0]

    def sink(chunk) -> None:
        if chunk.output_ids and not first.is_set():
            ttft[0] = time.perf_counter() - t0
            first.set()
        chunks.append(chunk)
        if chunk.finished:
            done.set()

    sp = SamplingParams(max_tokens=out_tokens, temperature=0, ignore_eos=True)
    engine.submit(GenerateRequest(rid, tuple(prompt), sp), sink)
    if not done.wait(600):
        raise RuntimeError(f"{rid} did not finish")
    if chunks[-1].error:
        raise RuntimeError(f"{rid}: {chunks[-1].error}")
    return ttft[0], [t for c in chunks for t in c.output_ids], chunks[-1].cached_tokens


def run_turns(engine: TorchEngine, chat: Chat, turns: range, run: Run, tag: str) -> None:
    """Every user's turns in `turns`, round-major, `--concurrency` in flight; a user's next
    turn waits for its previous reply."""
    args = chat.args
    ready = {u: threading.Event() for u in range(args.users)}
    for e in ready.values():
        e.set()
    lock = threading.Lock()

    def one(user: int, turn: int, wait: threading.Event, done: threading.Event) -> None:
        wait.wait()
        prompt = chat.histories[user] + chat.new_text(user, turn)
        ttft, reply, cached = ask(engine, f"{tag}-u{user}-t{turn}", prompt, args.out_tokens)
        chat.histories[user] = prompt + reply
        with lock:
            run.ttft_s.append(ttft)
            run.out_tokens += len(reply)
            run.cached_tokens += cached
            run.prompt_tokens += len(prompt)
        done.set()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = []
        for turn in turns:
            for user in range(args.users):
                done = threading.Event()
                futures.append(pool.submit(one, user, turn, ready[user], done))
                ready[user] = done
        for f in futures:
            f.result()
    run.wall_s += time.perf_counter() - t0


def wait_settled(engine: TorchEngine, timeout: float = 60.0) -> None:
    """Until the background offloads are done (their block references dropped)."""
    deadline = time.monotonic() + timeout
    while engine.stats().active_blocks and time.monotonic() < deadline:
        time.sleep(0.05)


def started(cfg: TorchEngineConfig) -> TorchEngine:
    engine = TorchEngine(cfg)
    engine.start()
    return engine


def one_round(args: argparse.Namespace, rnd: int, on_result: Callable[[str, dict], None]) -> None:
    for config in args.configs:
        with tempfile.TemporaryDirectory(prefix="kv-tiers-") as tmp:
            disk, snapshot = os.path.join(tmp, "disk"), os.path.join(tmp, "snapshot")
            chat, run = Chat(args), Run(config)
            engine = started(engine_config(args, config, disk))
            try:
                run_turns(engine, chat, range(args.turns), run, f"r{rnd}")
                wait_settled(engine)
                run.tiers = [asdict(t) for t in engine.stats().tiers]
                on_result(config, run.summary())
                if config != args.restart_config:
                    continue
                # Returning users: the same next turn to this worker and to a restarted one.
                shutil.copytree(disk, snapshot)
                saved = [list(h) for h in chat.histories]
                stay = Run("never_restarted")
                run_turns(engine, chat, range(args.turns, args.turns + 1), stay, f"r{rnd}-stay")
            finally:
                engine.shutdown()
            chat.histories = saved
            again = started(engine_config(args, config, snapshot))
            try:
                back = Run("restarted")
                run_turns(again, chat, range(args.turns, args.turns + 1), back, f"r{rnd}-back")
                back.tiers = [asdict(t) for t in again.stats().tiers]
            finally:
                again.shutdown()
            on_result("never_restarted", stay.summary())
            on_result("restarted", back.summary())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--turn-tokens", type=int, default=200)
    ap.add_argument("--out-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--pool-fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--restart-config", default="host_disk", choices=CONFIGS[3:])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset (device is always run)")
    ap.add_argument("--json", default=None)
    add_plot_flag(ap)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.configs = [c for c in CONFIGS if c == "device" or c in args.configs.split(",")]
    if args.restart_config not in args.configs:
        ap.error(f"--restart-config {args.restart_config} is not among --configs")
    setup_logging(args.verbose)
    results: dict[str, list[dict]] = {}
    load_before = os.getloadavg()

    def on_result(config: str, summary: dict) -> None:
        results.setdefault(config, []).append(summary)
        print(f"{config:>16}: TTFT mean {summary['ttft_mean_s'] * 1e3:7.0f} ms  p90 {summary['ttft_p90_s'] * 1e3:7.0f} ms"
              f"  {summary['turns_per_s']:.2f} turns/s  cached {summary['cached_fraction']:.0%}"
              f"  load {os.getloadavg()[0]:.2f}", flush=True)

    for rnd in range(args.rounds):
        one_round(args, rnd, on_result)

    def med(config: str, key: str) -> float:
        return statistics.median(r[key] for r in results[config])

    tiered = args.restart_config
    host_run = "host" if "host" in results else tiered
    host_hits = [t["hits"] / max(1, t["queried"]) for r in results[host_run] for t in r["tiers"] if t["medium"] == "CPU"]
    x = med("device", "ttft_mean_s") / med(tiered, "ttft_mean_s")
    h = statistics.median(host_hits) * 100
    r = med("restarted", "ttft_mean_s") / med("never_restarted", "ttft_mean_s")
    payload = {
        "args": vars(args), "cpus": sorted(os.sched_getaffinity(0)),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "results": results,
        "medians": {c: {k: med(c, k) for k in ("ttft_mean_s", "ttft_p90_s", "turns_per_s", "out_tok_per_s")} for c in results},
        "ttft_mean_x_vs_device": {c: med("device", "ttft_mean_s") / med(c, "ttft_mean_s") for c in args.configs},
        "host_hit_pct": h, "after_restart_x": r,
    }
    write_json(args.json, payload, plot=args.plot, name="kv_tiers")
    for c in args.configs[1:]:
        print(f"{c}: TTFT mean {payload['ttft_mean_x_vs_device'][c]:.2f}x lower than device-only")
    print(f"kv tiers: TTFT mean {x:.2f}x lower than device-only, host hit {h:.0f}%, after restart {r:.2f}x")
    return payload


if __name__ == "__main__":
    main()
