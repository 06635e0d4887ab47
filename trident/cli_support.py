"""The child processes and messages of `trident serve` and `trident cluster`: the OpenAI
frontend, the planner, secrets written for them, and the usage text."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from trident.core.errors import TridentError
from trident.launcher import Endpoints, Launcher, free_port
from trident.serve_config import ServeConfig

logger = logging.getLogger("trident")


class FrontendProcess:
    """The OpenAI frontend as a child process; `stop()` ends it (safe to call twice)."""

    def __init__(self, proc: subprocess.Popen[bytes], base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url

    def wait_ready(self, timeout_s: float) -> None:
        """Return once the frontend answers HTTP (any status: /health is 503 until a worker is)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TridentError(f"the OpenAI frontend exited with code {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.base_url}/health", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise TridentError(f"the OpenAI frontend did not answer at {self.base_url} within {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_child(self.proc, timeout_s)


def stop_child(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`. Safe to call twice."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_secret(path: str, value: str) -> None:
    """Write `value` to a new 0600 file (an existing one is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")


def start_planner(config: ServeConfig, ep: Endpoints, launcher: Launcher) -> subprocess.Popen[bytes] | None:
    """`python -m planner` against this server, with its key and run directory in its
    environment; its other settings come from the user's `TRIDENT_PLANNER_*` variables."""
    if not config.planner:
        return None
    env = {
        **os.environ,
        "TRIDENT_PLANNER_URL": ep.http_url,
        "TRIDENT_PLANNER_METRICS_URL": ep.metrics_url,
        "TRIDENT_PLANNER_ADMIN_KEY": launcher.key,
        "TRIDENT_PLANNER_ADMIN_KEY_FILE": "",  # this server's key, not one a shell variable points to
        "TRIDENT_PLANNER_MODEL_REPOSITORY": str(launcher.repository),
        "TRIDENT_PLANNER_LOG_LEVEL": config.log_level,
    }
    if launcher.kv_events_dir is not None:
        env["TRIDENT_PLANNER_RUN_DIR"] = str(launcher.kv_events_dir)
    if config.device.startswith("cuda"):
        env.setdefault("TRIDENT_PLANNER_DEVICE", "cuda")
    if config.prefill > 0:  # size the prefill pool too, from the count it started with
        env.setdefault("TRIDENT_PLANNER_MIN_PREFILL", "1")
        env.setdefault("TRIDENT_PLANNER_MAX_PREFILL", str(max(config.prefill, 4)))
    proc = subprocess.Popen([sys.executable, "-m", "planner"], env=env)
    logger.info("started the planner (pid %d)", proc.pid)
    return proc


def start_frontend(config: ServeConfig, ep: Endpoints, launcher: Launcher) -> FrontendProcess | None:
    """The OpenAI-compatible frontend, talking to the router over gRPC."""
    if config.openai_port < 0:
        return None
    port = config.openai_port or free_port(config.host)
    argv = [sys.executable, "-m", "frontend", "--host", config.host, "--port", str(port),
            "--triton-url", ep.grpc_url, "--triton-metrics-url", ep.metrics_url, "--log-level", config.log_level]
    env = {**os.environ, "TRIDENT_FRONTEND_API_KEY": config.api_key, "TRIDENT_FRONTEND_TRITON_ADMIN_KEY": launcher.key}
    frontend = FrontendProcess(subprocess.Popen(argv, env=env), f"http://{config.host}:{port}")
    try:
        frontend.wait_ready(config.startup_timeout_s)
    except BaseException:
        frontend.stop()
        raise
    return frontend


def usage(ep: Endpoints, launcher: Launcher, frontend: FrontendProcess | None = None) -> str:
    workers = ", ".join(launcher.decode_models)
    if launcher.prefill_models:
        workers += "; prefill workers: " + ", ".join(launcher.prefill_models)
    return "\n".join(
        [
            f"Trident is serving (decode workers: {workers}). Send requests to the `router` model:",
            f"  HTTP  {ep.http_url}/v2/models/router/generate         (one JSON response)",
            f"        {ep.http_url}/v2/models/router/generate_stream  (server-sent events)",
            f"  gRPC  {ep.grpc_url}  (tritonclient streaming, model 'router')",
            f"  metrics {ep.metrics_url}",
            *([f"  OpenAI  {frontend.base_url}/v1  (chat/completions, completions, models)"] if frontend else []),
            "  e.g. curl -s -X POST " + ep.http_url + "/v2/models/router/generate "
            "-d '{\"text_input\": \"The capital of France is\", \"max_tokens\": 16}'",
            f"  tritonserver log: {launcher.log_path or 'this terminal'}. Press Ctrl-C to stop.",
        ]
    )


def worker_usage(ep: Endpoints, launcher: Launcher) -> str:
    cfg = launcher.config
    where = f"registered in etcd at {cfg.etcd}" if cfg.etcd else "list them in the routers' --remote-workers"
    workers = ", ".join(f"{cfg.node_name}/{m}" for m in launcher.decode_models + launcher.prefill_models)
    return (
        f"Trident worker node {cfg.node_name} is up: {workers} ({where}); gRPC {ep.grpc_url}, "
        f"metrics {ep.metrics_url}. Press Ctrl-C to stop."
    )
