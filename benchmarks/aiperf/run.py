"""Benchmark the OpenAI frontend with NVIDIA aiperf: TTFT, inter-token latency, throughput.

Runs against a frontend that is already serving (`trident serve`, or `python -m frontend`
next to a running tritonserver). aiperf lives in its own virtual environment
(`.cache/.venv-aiperf`, git-ignored, created on first use) so its pins never touch
ours. Its tokenizer is a local directory exported from the served model by
`router_ensemble.text.tokenizer.export_hf_tokenizer`; the Hugging Face hub is never contacted.

Two workloads:
  shared-system: single-turn chat, every request opens with the same long system prompt
                 (the prefix cache / KV-aware routing case);
  multi-turn:    conversations of several turns, each resending the growing history.

    .venv/bin/python benchmarks/aiperf/run.py --url http://127.0.0.1:9000 [--json out.json]

The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

AIPERF_SPEC = "aiperf==0.13.0"
SUMMARY_FILE = "profile_export_aiperf.json"
# aiperf metric tag -> (label, unit) for the table; values come from its JSON export.
METRICS = {
    "time_to_first_token": ("TTFT", "ms"),
    "inter_token_latency": ("ITL", "ms"),
    "request_latency": ("latency", "ms"),
    "output_token_throughput": ("output tok/s", "tokens/sec"),
    "request_throughput": ("req/s", "requests/sec"),
}


@dataclass(frozen=True, slots=True)
class Workload:
    """One aiperf run: a name and the workload-specific aiperf flags."""

    name: str
    flags: tuple[str, ...]
    description: str


@dataclass(slots=True)
class Result:
    workload: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default=os.environ.get("TRIDENT_FRONTEND_URL", "http://127.0.0.1:9000"))
    p.add_argument("--api-key", default=os.environ.get("TRIDENT_FRONTEND_API_KEY"))
    p.add_argument("--model", default="", help="model id to request (default: first of /v1/models)")
    p.add_argument(
        "--model-path",
        default=os.environ.get("TRIDENT_MODEL", ""),
        help="GGUF / HF dir for the tokenizer ('' = default model)",
    )
    p.add_argument(
        "--venv",
        default=str(REPO_ROOT / ".cache" / ".venv-aiperf"),
        help="aiperf's own virtual environment",
    )
    p.add_argument("--aiperf-spec", default=AIPERF_SPEC, help="pip requirement for aiperf")
    p.add_argument(
        "--out-dir", default="", help="artifacts directory (default .cache/aiperf/<time>)"
    )
    p.add_argument("--workloads", default="shared-system,multi-turn")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument(
        "--requests", type=int, default=16, help="requests of the shared-system workload"
    )
    p.add_argument("--isl", type=int, default=48, help="mean user-prompt tokens")
    p.add_argument("--osl", type=int, default=32, help="output tokens per request")
    p.add_argument(
        "--system-prompt-length", type=int, default=256, help="shared system prompt tokens"
    )
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests before each run")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="limit per aiperf run")
    p.add_argument("--json", default="", help="write the results here as JSON")
    p.add_argument("--plot", action="store_true", help="also write PNG plots beside --json (benchmarks.plots)")
    return p.parse_args(argv)


def workloads(args: argparse.Namespace) -> list[Workload]:
    common = (
        "--isl",
        str(args.isl),
        "--synthetic-input-tokens-stddev",
        "0",
        "--osl",
        str(args.osl),
        "--osl-stddev",
        "0",
    )
    table = {
        "shared-system": Workload(
            "shared-system",
            common
            + (
                "--shared-system-prompt-length",
                str(args.system_prompt_length),
                "--request-count",
                str(args.requests),
            ),
            f"{args.requests} chats, {args.system_prompt_length}-token shared system prompt",
        ),
        "multi-turn": Workload(
            "multi-turn",
            common
            + (
                "--conversation-num",
                str(args.conversations),
                "--conversation-turn-mean",
                str(args.turns),
                "--conversation-turn-stddev",
                "0",
                "--request-count",
                str(args.conversations * args.turns),
            ),
            f"{args.conversations} conversations x {args.turns} turns",
        ),
    }
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in chosen if w not in table]
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {sorted(table)}")
    return [table[w] for w in chosen]


def ensure_aiperf(venv: Path, spec: str) -> Path:
    """The aiperf executable of `venv`, creating the environment on first use."""
    exe = venv / "bin" / "aiperf"
    if exe.exists():
        return exe
    log(f"creating {venv} and installing {spec} (first run only)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [spec], check=True)
    return exe


def http_json(url: str, api_key: str | None, timeout: float = 10.0) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def check_frontend(url: str, api_key: str | None, model: str) -> str:
    """Fail early unless the frontend is ready; return the model id to request."""
    try:
        status, health = http_json(f"{url}/health", api_key)
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"no frontend at {url}: {exc}. Start it first: `trident serve`") from None
    if status != 200:
        raise SystemExit(f"frontend at {url} is not ready: {health}")
    if model:
        return model
    status, models = http_json(f"{url}/v1/models", api_key)
    if status != 200 or not models.get("data"):
        raise SystemExit(f"GET {url}/v1/models failed: {models}")
    return str(models["data"][0]["id"])


def run_aiperf(
    exe: Path, args: argparse.Namespace, model: str, tokenizer: Path, work: Workload, out: Path
) -> Result:
    artifacts = out / work.name
    cmd = [
        str(exe), "profile",
        "--model", model,
        "--url", args.url,
        "--endpoint-type", "chat",
        "--streaming",
        "--tokenizer", str(tokenizer),
        "--concurrency", str(args.concurrency),
        "--random-seed", "1234",
        "--extra-inputs", "ignore_eos:true",
        # Count tokens from our `usage` (per chunk: stream_options.continuous_usage_stats)
        # rather than re-tokenizing the text, which drifts by a few tokens.
        "--use-server-token-count",
        "--per-chunk-usage",
        "--warmup-request-count", str(args.warmup),
        "--artifact-dir", str(artifacts),
        "--ui-type", "none",
        "--no-gpu-telemetry",
        "--workers-max", "1",
        *work.flags,
    ]  # fmt: skip
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    # No hub access. Not via HF_HUB_OFFLINE: in that mode aiperf looks a tokenizer up in the
    # hub cache even when given a directory. A local path skips the hub; pointing the hub
    # endpoint at a closed port makes any stray call fail at once instead of reaching out.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(var, None)
    log(f"[{work.name}] {work.description}: {' '.join(cmd[2:])}")
    started = time.monotonic()
    artifacts.mkdir(parents=True, exist_ok=True)
    with open(artifacts / "aiperf.log", "w") as logf:
        proc = subprocess.run(
            cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=args.timeout_s, check=False
        )
    wall = time.monotonic() - started
    summary = next(iter(sorted(artifacts.rglob(SUMMARY_FILE))), None)
    if proc.returncode != 0 or summary is None:
        tail = (artifacts / "aiperf.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"aiperf failed for {work.name} (rc={proc.returncode}); log tail:\n{tail}")
    return parse_summary(work.name, json.loads(summary.read_text()), wall)


def parse_summary(name: str, data: dict[str, Any], wall_s: float) -> Result:
    """Pull the metrics we report out of aiperf's JSON export (tolerant of layout)."""
    records = data.get("records", data)
    result = Result(workload=name, wall_s=wall_s)
    for tag in METRICS:
        entry = records.get(tag)
        if isinstance(entry, dict):
            result.metrics[tag] = {
                k: float(v)
                for k, v in entry.items()
                if k in ("avg", "p50", "p90", "p99", "min", "max") and isinstance(v, (int, float))
            }
    count = records.get("request_count")
    result.requests = int(count.get("avg", 0)) if isinstance(count, dict) else int(count or 0)
    errors = data.get("error_summary") or []
    result.errors = sum(int(e.get("count", 0)) for e in errors if isinstance(e, dict))
    err_count = records.get("error_request_count")
    if isinstance(err_count, dict):
        result.errors = max(result.errors, int(err_count.get("avg", 0)))
    return result


def print_table(results: list[Result]) -> None:
    header = f"{'workload':<14} {'reqs':>5} {'errs':>5} {'TTFT avg':>10} {'TTFT p99':>10} {'ITL avg':>9} {'ITL p99':>9} {'tok/s':>8} {'req/s':>7}"
    print(header)
    print("-" * len(header))
    for r in results:

        def get(tag: str, stat: str, r: Result = r) -> float:
            return r.metrics.get(tag, {}).get(stat, float("nan"))

        print(
            f"{r.workload:<14} {r.requests:>5} {r.errors:>5} "
            f"{get('time_to_first_token', 'avg'):>8.1f}ms {get('time_to_first_token', 'p99'):>8.1f}ms "
            f"{get('inter_token_latency', 'avg'):>7.1f}ms {get('inter_token_latency', 'p99'):>7.1f}ms "
            f"{get('output_token_throughput', 'avg'):>8.1f} {get('request_throughput', 'avg'):>7.2f}"
        )


def one_line(results: list[Result]) -> str:
    parts = []
    for r in results:
        ttft = r.metrics.get("time_to_first_token", {}).get("avg", float("nan"))
        itl = r.metrics.get("inter_token_latency", {}).get("avg", float("nan"))
        tps = r.metrics.get("output_token_throughput", {}).get("avg", float("nan"))
        parts.append(
            f"{r.workload}: TTFT {ttft:.0f} ms, ITL {itl:.1f} ms, {tps:.1f} tok/s, {r.errors} errors"
        )
    return "aiperf summary | " + " | ".join(parts)


def log(message: str) -> None:
    print(f"[aiperf-bench] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.url = args.url.rstrip("/")
    chosen = workloads(args)
    model = check_frontend(args.url, args.api_key, args.model)
    out = Path(args.out_dir or REPO_ROOT / ".cache" / "aiperf" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    exe = ensure_aiperf(Path(args.venv), args.aiperf_spec)

    from router_ensemble.text.tokenizer import export_hf_tokenizer

    tokenizer = out / "tokenizer"
    shutil.rmtree(tokenizer, ignore_errors=True)
    export_hf_tokenizer(args.model_path, str(tokenizer))
    log(f"model {model!r}, tokenizer exported to {tokenizer}, artifacts in {out}")

    results = [run_aiperf(exe, args, model, tokenizer, w, out) for w in chosen]
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if args.plot:
        from benchmarks.plots import write_plots

        write_plots(args.json, {"benchmark": "aiperf", "runs": [asdict(r) for r in results]}, "aiperf")
    print(one_line(results))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
