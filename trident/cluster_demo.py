"""`trident cluster`: a multi-node cluster on one machine, in one command.

Starts a local etcd, writes a fresh cluster secret (a 0600 file, handed to every server as
`TRIDENT_KV_SECRET_FILE`), then one tritonserver per node, each on its own loopback address
as if it were its own machine:

- `node-b` (127.0.0.2, `--role worker`): `--decode` decode workers;
- `node-c` (127.0.0.3, `--role worker`): `--prefill` prefill workers (at least 1);
- the router node (127.0.0.1): the router, one local decode worker and the OpenAI frontend,
  finding the other nodes' workers through etcd; prompts with `--disagg-threshold`
  uncached tokens or more (default here 256) are prefilled on node-c.

Send requests to the router node as to `trident serve`. Ctrl-C stops everything. The other
flags of `trident serve` (`--model`, `--dtype`, `--kv-cache-mb`, `--openai-port`, ...) apply
as they do there (engine flags to every node).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from trident.cli_support import start_frontend, usage, write_secret
from trident.core.errors import TridentError
from trident.etcd_process import EtcdProcess
from trident.launcher import Launcher
from trident.serve_config import ServeConfig

logger = logging.getLogger("trident")


def node_configs(base: ServeConfig, etcd: str, run_dir: Path, decode: int, prefill: int,
                 disagg_threshold: int) -> dict[str, ServeConfig]:
    """The servers of the demo, by node name (the router node last: it starts last)."""
    common = dict(http_port=0, grpc_port=0, metrics_port=0, etcd=etcd, planner=False, openai_port=-1)
    nodes = {
        "node-b": dataclasses.replace(base, **common, role="worker", host="127.0.0.2", node_name="node-b", node_address="127.0.0.2",
                                      decode=decode, prefill=0, server_log=str(run_dir / "node-b.log")),
    }
    if prefill:
        nodes["node-c"] = dataclasses.replace(base, **common, role="worker", host="127.0.0.3", node_name="node-c",
                                              node_address="127.0.0.3", decode=0, prefill=prefill,
                                              server_log=str(run_dir / "node-c.log"))
    nodes["router"] = dataclasses.replace(base, role="both", etcd=etcd, decode=1, prefill=0, planner=False,
                                          disagg_threshold=disagg_threshold,
                                          server_log=base.server_log or str(run_dir / "router.log"))
    return {name: config.validate() for name, config in nodes.items()}


def cluster_command(base: ServeConfig) -> int:
    decode, prefill = base.decode, max(1, base.prefill)
    disagg_threshold = 256 if base.disagg_threshold < 0 else base.disagg_threshold
    logging.basicConfig(level=logging.INFO, format="[trident] %(message)s", stream=sys.stderr)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    run_dir = Path(tempfile.mkdtemp(prefix="trident-cluster-"))
    etcd = EtcdProcess(run_dir / "etcd")
    launchers: dict[str, Launcher] = {}
    frontend = None
    old_secret = os.environ.get("TRIDENT_KV_SECRET_FILE")
    try:
        secret_file = run_dir / "cluster.secret"
        write_secret(str(secret_file), secrets.token_urlsafe(32))
        os.environ["TRIDENT_KV_SECRET_FILE"] = str(secret_file)  # every server inherits it
        etcd.start()
        logger.info("etcd at %s; run directory %s", etcd.url, run_dir)
        for name, config in node_configs(base, etcd.url, run_dir, decode, prefill, disagg_threshold).items():
            logger.info("starting %s ...", name)
            launchers[name] = Launcher(config, progress=logger.info)
            endpoints = launchers[name].start()
        router = launchers["router"]
        frontend = start_frontend(router.config, endpoints, router)
        logger.info(usage(endpoints, router, frontend))
        logger.info("other nodes: %s (logs in %s)", ", ".join(n for n in launchers if n != "router"), run_dir)
        while not stop.wait(0.5):
            for name, launcher in launchers.items():
                if not launcher.is_running():
                    logger.error("%s's tritonserver exited (log: %s)", name, launcher.log_path)
                    return 1
        return 0
    except TridentError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        if frontend is not None:
            frontend.stop()
        for launcher in reversed(list(launchers.values())):
            launcher.stop()
        etcd.stop()
        if old_secret is None:
            os.environ.pop("TRIDENT_KV_SECRET_FILE", None)
        else:
            os.environ["TRIDENT_KV_SECRET_FILE"] = old_secret
        for sig, handler in previous.items():
            signal.signal(sig, handler)
