"""`python -m planner` (also `trident plan`, and `trident serve --planner` starts it beside
the server): resize the decode and prefill pools of a running Trident service.

Flags and `TRIDENT_PLANNER_*` variables: `planner.config.PlannerConfig`. The model-repository
key comes from `--admin-key-file` or `TRIDENT_PLANNER_ADMIN_KEY`, never a flag. Stops on
SIGINT/SIGTERM after the change under way (a drain) has finished or been cut short.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from planner.config import ENV_PREFIX, HELP, PlannerConfig
from planner.connectors.base import Connector
from planner.core.profile import Profile
from planner.loop import PlannerLoop
from planner.metrics import scrape
from trident.core.endpoints import EVENTS_DIR_ENV
from trident.core.errors import ConfigError, TridentError
from trident.core.flags import add_flags, from_namespace
from trident.model_control import ModelControl

logger = logging.getLogger("planner")
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: Sequence[str], env: dict[str, str] | None = None) -> PlannerConfig:
    parser = add_flags(argparse.ArgumentParser(prog="planner", description="Resize the worker pools of a running Trident service",
                                               allow_abbrev=False),
                       PlannerConfig, HELP, ENV_PREFIX)
    args = parser.parse_args(list(argv))
    try:
        return from_namespace(PlannerConfig, args, os.environ if env is None else env, ENV_PREFIX)
    except ConfigError as exc:
        parser.error(str(exc))
        raise


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=config.log_level.upper(), format="[planner] %(message)s", stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        loop = build_loop(config)
        logger.info("planner: mode %s, connector %s, pools %s, budget %g",
                    config.mode, loop.connector.name, ", ".join(config.pools), loop.budget)
        exporter = None
        if config.exporter_port:
            from planner.exporter import PlannerExporter

            exporter = PlannerExporter(loop, config.exporter_host, config.exporter_port).start()
        try:
            loop.run(stop)
        finally:
            if exporter is not None:
                exporter.stop()
    except TridentError as exc:
        logger.error("%s", exc)
        return 1
    return 0


def build_loop(config: PlannerConfig) -> PlannerLoop:
    profile = Profile.load(config.profile) if config.profile else None
    gpus = 0
    if config.device == "cuda":
        from trident.launcher import gpu_count

        gpus = gpu_count()
    return PlannerLoop(
        config, build_connector(config, gpus),
        lambda t: scrape(config.metrics_url, t), config.budget_units(gpus), profile,
    )


def build_connector(config: PlannerConfig, gpus: int = 0) -> Connector:
    if config.connector == "kubernetes":
        from planner.connectors.kubernetes import KubernetesConnector, parse_workloads

        return KubernetesConnector(parse_workloads(config.k8s_workloads), config.k8s_namespace)
    from planner.connectors.triton import TritonConnector

    control = ModelControl(config.url, config.admin_key(), timeout_s=config.load_timeout_s)
    triton = TritonConnector(
        control,
        Path(config.model_repository or REPO_ROOT / "model_repository").resolve(),
        find_run_dir(config),
        lambda: scrape(config.metrics_url, 0.0),
        config.pools,
        gpus=gpus,
        root=str(REPO_ROOT),
        drain_timeout_s=config.drain_timeout_s,
        load_timeout_s=config.load_timeout_s,
    )
    if config.connector == "advisory":
        from planner.connectors.advisory import AdvisoryConnector

        return AdvisoryConnector(triton.replicas)
    return triton


def find_run_dir(config: PlannerConfig, env: dict[str, str] | None = None) -> Path:
    """Where the server's workers publish KV events, and drain markers go: `--run-dir`, the
    server's `TRIDENT_KV_EVENTS_DIR`, or the one per-server default directory of this user."""
    env = dict(os.environ) if env is None else env
    explicit = config.run_dir or env.get(EVENTS_DIR_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    base = Path(tempfile.gettempdir()) / f"trident-kv-{os.getuid()}"
    found = sorted(base.glob("server-*")) if base.is_dir() else []
    if len(found) != 1:
        raise ConfigError(
            f"run_dir: cannot tell which server's run directory to use ({len(found)} under {base}); "
            f"pass --run-dir or set {EVENTS_DIR_ENV}"
        )
    return found[0]
