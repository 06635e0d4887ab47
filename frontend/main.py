"""Run the frontend: build the app from a `FrontendConfig` and serve it with uvicorn.

`python -m frontend [flags]` and `trident serve` end up in `run(config)`. `serve_in_thread`
starts the same server on a background thread (tests, `trident serve` in-process) and
returns once it accepts connections.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import uvicorn

from frontend.app import create_app
from frontend.args import FrontendConfig, parse_args
from trident.core.errors import TridentError

logger = logging.getLogger(__name__)


def build_server(config: FrontendConfig) -> uvicorn.Server:
    """A uvicorn server for `config`, not yet started."""
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        access_log=config.log_level.lower() == "debug",
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(uv_config)


def run(config: FrontendConfig) -> None:
    """Serve until interrupted (blocks)."""
    logger.info(
        "OpenAI frontend on http://%s:%d -> Triton %s", config.host, config.port, config.triton_url
    )
    build_server(config).run()


@dataclass(slots=True)
class BackgroundFrontend:
    """A frontend served from a daemon thread; `stop()` shuts it down (safe to call twice)."""

    server: uvicorn.Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        sockets = [s for srv in (self.server.servers or []) for s in srv.sockets]
        return int(sockets[0].getsockname()[1]) if sockets else self.server.config.port

    @property
    def base_url(self) -> str:
        return f"http://{self.server.config.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def serve_in_thread(config: FrontendConfig, start_timeout_s: float = 30.0) -> BackgroundFrontend:
    """Start the frontend on a daemon thread; return when it is listening."""
    server = build_server(config)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve()), name="trident-frontend", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise TridentError(f"the frontend did not start on {config.host}:{config.port}")
        time.sleep(0.05)
    return BackgroundFrontend(server, thread)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = parse_args(argv)
    except TridentError as exc:
        raise SystemExit(f"python -m frontend: error: {exc}") from None
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(config)
