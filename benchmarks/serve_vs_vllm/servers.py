"""The three servers and the benchmark client, as child processes of `benchmarks.serve_vs_vllm`.

`main.run_one` calls `start_server` (one `Server` per system and workload, with the command and
environment of `vllm serve` or `trident serve`), `Server.wait_ready`, `warm_up`, `run_client`
(`vllm bench serve` against the server) and, in a `finally`, `Server.stop` (safe to call twice).
Every child runs under `taskset -c --cores` (`pinned`) in the environment of `child_env`. What a
run can survive is raised as `BenchError`. Imports `workloads` (for `Workload`), nothing else of
this package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serve_vs_vllm.workloads import Workload

logger = logging.getLogger(__name__)

SYSTEMS = ("vllm-serve", "trident-torch", "trident-vllm")
# The same engine settings for `vllm serve` (flags) and Trident's vLLM workers (TRIDENT_<KEY>).
VLLM_SETTINGS = {"block_size": 32, "max_model_len": 2048, "max_num_seqs": 64, "max_num_batched_tokens": 2048}
KEPT_TRIDENT_ENV = ("TRIDENT_TRITONSERVER", "TRIDENT_CACHE_DIR")
DROPPED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")  # KV size and threads: set here or defaults
METRICS = (
    "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "p99_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "duration", "completed", "failed",
)
MiB = 1 << 20


class BenchError(RuntimeError):
    """A server that would not start, or a client run that failed."""


def parse_cores(spec: str) -> list[int]:
    """`"0,1"` or `"0-3,6"` -> core ids."""
    cores: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in DROPPED_ENV and (not k.startswith("TRIDENT_") or k in KEPT_TRIDENT_ENV)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.update(extra or {})
    return env


def pinned(args: argparse.Namespace, *cmd: str) -> list[str]:
    return ["taskset", "-c", args.cores, *cmd]


def vllm_serve_command(args: argparse.Namespace, model_dir: str, name: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.vllm_cli", "serve", model_dir, "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
           "--kv-cache-memory-bytes", str(args.kv_cache_mb * MiB), "--enable-prefix-caching",
           "--generation-config", "vllm", "--seed", "0", "--uvicorn-log-level", "warning"]
    for key, value in VLLM_SETTINGS.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    return pinned(args, *cmd)


def trident_command(args: argparse.Namespace, engine: str, decode: int, port: int, log: str) -> list[str]:
    cmd = [sys.executable, "-m", "trident", "serve", "--engine", engine, "--decode", str(decode),
           "--openai-port", str(port), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
           "--kv-cache-mb", str(args.kv_cache_mb), "--dtype", args.dtype, "--log-level", "warning",
           "--server-log", log, "--startup-timeout-s", str(args.startup_timeout)]
    if args.model:
        cmd += ["--model", args.model]
    if engine == "torch":
        cmd += ["--num-threads", str(max(1, len(parse_cores(args.cores)) // decode))]
    return pinned(args, *cmd)


def trident_env(args: argparse.Namespace, engine: str) -> dict[str, str]:
    env = {"TRIDENT_MAX_MODEL_LEN": str(VLLM_SETTINGS["max_model_len"])}
    if engine == "vllm":
        env.update({f"TRIDENT_{k.upper()}": str(v) for k, v in VLLM_SETTINGS.items()})
        env["TRIDENT_ENABLE_PREFIX_CACHING"] = "true"
        env["TRIDENT_ENFORCE_EAGER"] = "1" if args.enforce_eager else "0"
    return child_env(env)


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group), from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def log_tail(path: str, lines: int = 15) -> str:
    """The last line of a log, then its path and last `lines` lines (for an error message)."""
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        tail = [line.rstrip() for line in f.readlines()[-lines:]]
        last = next((line for line in reversed(tail) if line.strip()), "")
        return f"{last[:200]} (log {path})\n" + "\n".join(tail)
    return f"(no log at {path})"


def group_alive(pgid: int) -> bool:
    return any(group == pgid for _, group in process_table().values())


class Server:
    """One server process in its own session; `stop()` ends it and every process group of its
    descendants (safe to call twice)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str, port: int) -> None:
        self.name, self.log_path, self.base_url = name, log_path, f"http://127.0.0.1:{port}"
        self.command = cmd
        with open(log_path, "ab") as log:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.groups: set[int] = set()

    def _note_groups(self) -> None:
        """Remember the process groups of all descendants (tritonserver starts its own session)."""
        table = process_table()
        frontier, seen = [self.pid], {self.pid}
        while frontier:
            parent = frontier.pop()
            for pid, (ppid, group) in table.items():
                if ppid == parent and pid not in seen:
                    seen.add(pid)
                    frontier.append(pid)
                    self.groups.add(group)

    def wait_ready(self, timeout_s: float) -> str:
        """Block until /health answers 200 and /v1/models names a model; return its id."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited before it was ready: {log_tail(self.log_path)}")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    models = httpx.get(f"{self.base_url}/v1/models", timeout=5).json()["data"]
                    self._note_groups()
                    return str(models[0]["id"])
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready within {timeout_s:.0f}s: {log_tail(self.log_path)}")
            time.sleep(1.0)

    def stop(self, grace_s: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._note_groups()
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 15.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        for group in {proc.pid, *self.groups}:  # what outlives the main process (vLLM's resource tracker, ...)
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    logger.info("%s: process group %d still running; sending %s", self.name, group, sig.name)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, sig)
                deadline = time.monotonic() + 10.0
                while group_alive(group) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not group_alive(group):
                    break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def start_server(args: argparse.Namespace, system: str, work: Workload, model_dir: str, name: str, stem: str) -> Server:
    from trident.launcher import free_port

    port = free_port()
    if system == "vllm-serve":
        env = child_env({"VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind} if args.vllm_omp_bind else None)
        return Server(system, vllm_serve_command(args, model_dir, name, port), env, f"{stem}.server.log", port)
    engine = system.removeprefix("trident-")
    cmd = trident_command(args, engine, work.decode, port, f"{stem}.tritonserver.log")
    return Server(system, cmd, trident_env(args, engine), f"{stem}.server.log", port)


def warm_up(base_url: str, model: str, requests: int, concurrency: int) -> None:
    """A few requests unrelated to the workloads (first-call costs, and each worker touched)."""
    def one(i: int) -> None:
        text = f"Warm-up {i}. Repeat these numbers: " + " ".join(str(i * 1000 + n) for n in range(60))
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                "ignore_eos": True, "temperature": 0.0}
        httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=600).raise_for_status()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))


def run_client(args: argparse.Namespace, work: Workload, server: Server, model: str, model_dir: str,
               stem: str) -> dict[str, Any]:
    """`vllm bench serve` against `server`; vLLM's result JSON, less its per-request lists."""
    result_dir, result_file = os.path.dirname(stem), os.path.basename(stem) + ".bench.json"
    cmd = pinned(args, sys.executable, "-m", "benchmarks.vllm_cli", "bench", "serve", "--backend", "openai-chat",
                 "--base-url", server.base_url, "--endpoint", "/v1/chat/completions", "--model", model,
                 "--tokenizer", model_dir, "--max-concurrency", str(args.concurrency),
                 "--request-rate", str(args.request_rate), "--ignore-eos", "--temperature", "0",
                 "--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
                 "--metric-percentiles", "50,99", "--save-result", "--save-detailed", "--result-dir", result_dir,
                 "--result-filename", result_file, "--label", server.name, "--disable-tqdm", *work.flags)
    with open(f"{stem}.client.log", "wb") as log:
        try:
            rc = subprocess.run(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                timeout=args.bench_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    path = os.path.join(result_dir, result_file)
    if rc != 0 or not os.path.isfile(path):
        raise BenchError(f"vllm bench serve failed (exit {rc}): {log_tail(f'{stem}.client.log')}")
    with open(path) as f:
        raw = json.load(f)
    errors = sorted({e for e in raw.get("errors", []) if e})[:3]
    return {**{m: raw.get(m) for m in METRICS}, "errors": errors}
