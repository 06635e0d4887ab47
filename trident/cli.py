"""The `trident` command. `trident serve` starts tritonserver on the model repository.

Flags of every subcommand also read `TRIDENT_*` environment variables (see
`trident.serve_config`). Output for people goes to stderr through `logging`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from frontend.args import FrontendConfig
from frontend.main import BackgroundFrontend, serve_in_thread
from trident.core.errors import TridentError
from trident.launcher import Endpoints, Launcher
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


def start_frontend(config: ServeConfig, ep: Endpoints, launcher: Launcher) -> BackgroundFrontend | None:
    """The OpenAI-compatible frontend, in this process, talking to the router over gRPC."""
    if config.openai_port < 0:
        return None
    fe_config = FrontendConfig(
        host=config.host,
        port=config.openai_port,
        triton_url=ep.grpc_url,
        api_key=config.api_key or None,
        triton_admin_key=launcher.key,
        log_level=config.log_level,
    ).validate()
    return serve_in_thread(fe_config)


def usage(ep: Endpoints, launcher: Launcher, frontend: BackgroundFrontend | None = None) -> str:
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
