"""The `trident` command. `trident serve` starts tritonserver on the model repository.

Flags of every subcommand also read `TRIDENT_*` environment variables (see
`trident.serve_config`). Output for people goes to stderr through `logging`. The OpenAI
frontend runs as its own process (`python -m frontend`), started and stopped here; its keys
travel in its environment, never on its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from trident.cli_support import (
    start_frontend,
    start_planner,
    stop_child,
    usage,
    worker_usage,
    write_secret,
)
from trident.cluster_demo import cluster_command
from trident.core.errors import TridentError
from trident.launcher import Launcher
from trident.serve_config import ServeConfig, build_parser

logger = logging.getLogger("trident")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trident", description="Disaggregated, KV-aware LLM serving on Triton",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start tritonserver with the router, decode and prefill workers",
                           allow_abbrev=False)
    build_parser(serve)
    cluster = sub.add_parser("cluster", help="a multi-node cluster on this machine: etcd and one tritonserver per node",
                             allow_abbrev=False)
    build_parser(cluster)
    sub.add_parser("plan", help="run the planner against a running server (`trident plan --help`)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # the planner parses its own flags (planner.config)
        os.execv(sys.executable, [sys.executable, "-m", "planner", *argv[1:]])  # signals reach it directly
    args = parser.parse_args(argv)
    commands = {"serve": serve_command, "cluster": cluster_command}
    if args.command not in commands:
        parser.error(f"unknown command {args.command!r}")
    try:
        config = ServeConfig.from_namespace(args, os.environ)
    except TridentError as exc:
        parser.error(str(exc))
    return commands[args.command](config)


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
    frontend = planner = None
    key_file = ""
    try:
        endpoints = launcher.start()
        if config.admin_key_file:
            key_file = os.path.expanduser(config.admin_key_file)
            write_secret(key_file, launcher.key)
        if config.role == "worker":  # no router here: nothing for a frontend or a planner to drive
            logger.info(worker_usage(endpoints, launcher))
        else:
            frontend = start_frontend(config, endpoints, launcher)
            planner = start_planner(config, endpoints, launcher)
            logger.info(usage(endpoints, launcher, frontend))
        while not stop.wait(0.5):
            if not launcher.is_running():
                logger.error("tritonserver exited unexpectedly (log: %s)", launcher.log_path)
                return 1
            if planner is not None and planner.poll() is not None:
                logger.error("the planner exited with code %s; serving on without it", planner.returncode)
                planner = None
        return 0
    except TridentError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if planner is not None:
            stop_child(planner, timeout_s=30.0)
        if frontend is not None:
            frontend.stop()
        launcher.stop()
        if key_file:
            with contextlib.suppress(OSError):
                os.unlink(key_file)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
