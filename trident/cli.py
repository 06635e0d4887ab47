"""The `trident` command. `trident serve` starts tritonserver on the model repository.

Flags of every subcommand also read `TRIDENT_*` environment variables (see
`trident.serve_config`). Output for people goes to stderr through `logging`. The OpenAI
frontend runs as its own process (`python -m frontend`), started and stopped here; its keys
travel in its environment, never on its command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType

from trident.core.errors import TridentError
from trident.launcher import Endpoints, Launcher, free_port
from trident.serve_config import ServeConfig, build_parser

logger = logging.getLogger("trident")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trident", description="Disaggregated, KV-aware LLM serving on Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start tritonserver with the router, decode and prefill workers")
    build_parser(serve)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "serve":
        try:
            config = ServeConfig.from_namespace(args, os.environ)
        except TridentError as exc:
            parser.error(str(exc))
        return serve_command(config)
    parser.error(f"unknown command {args.command!r}")
    return 2


def serve_command(config: ServeConfig) -> int:
    """Run until Ctrl-C / SIGTERM or until the server dies; always clean up."""
    level = logging.DEBUG if config.log_level == "debug" else logging.INFO
    logging.basicConfig(level=level, format="[trident] %(message)s", stream=sys.stderr)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    launcher = Launcher(config, progress=logger.info)
    frontend = None
    try:
        endpoints = launcher.start()
        frontend = start_frontend(config, endpoints, launcher)
        logger.info(usage(endpoints, launcher, frontend))
        while not stop.wait(0.5):
            if not launcher.is_running():
                logger.error("tritonserver exited unexpectedly (log: %s)", launcher.log_path)
                return 1
        return 0
    except TridentError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if frontend is not None:
            frontend.stop()
        launcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_frontend(config: ServeConfig, ep: Endpoints, launcher: Launcher) -> FrontendProcess | None:
    """The OpenAI-compatible frontend, talking to the router over gRPC."""
    if config.openai_port < 0:
        return None
    port = config.openai_port or free_port(config.host)
    argv = [sys.executable, "-m", "frontend", "--host", config.host, "--port", str(port),
            "--triton-url", ep.grpc_url, "--log-level", config.log_level]
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
