"""The real tritonserver, started once per test session through Trident's launcher.

Reuse it from any test package with

    from tests.integration.server_fixture import triton_server  # noqa: F401  (a pytest fixture)

The server runs the repository's router and two decode workers (`decode`, `decode_1`) on the
default model with a small KV pool and one torch thread per worker, on free ports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from trident.launcher import Launcher
from trident.serve_config import ServeConfig

logger = logging.getLogger(__name__)

DECODE_WORKERS = 2
KV_CACHE_MB = 64


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Where the test server listens."""

    http_url: str  # http://127.0.0.1:PORT
    grpc_url: str  # 127.0.0.1:PORT
    metrics_url: str  # http://127.0.0.1:PORT/metrics
    decode_models: tuple[str, ...]
    log_path: str
    launcher: Launcher


def serve_config_for_tests(tmp_dir: str) -> ServeConfig:
    return ServeConfig(
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        decode=DECODE_WORKERS,
        kv_cache_mb=KV_CACHE_MB,
        num_threads=1,
        # float32: tests compare greedy outputs across batch sizes and prefix-cache hits,
        # which bfloat16's rounding can flip on a close call
        dtype="float32",
        log_level=os.environ.get("TRIDENT_TEST_LOG_LEVEL", "info"),
        server_log=os.path.join(tmp_dir, "tritonserver.log"),
        startup_timeout_s=600.0,
    )




@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerInfo]:
    tmp_dir = str(tmp_path_factory.mktemp("tritonserver"))
    launcher = Launcher(serve_config_for_tests(tmp_dir), progress=logger.info)
    try:
        ep = launcher.start()
    except Exception as exc:
        pytest.fail(f"tritonserver did not start: {exc}")
    try:
        yield ServerInfo(
            http_url=ep.http_url,
            grpc_url=ep.grpc_url,
            metrics_url=ep.metrics_url,
            decode_models=tuple(launcher.decode_models),
            log_path=str(launcher.log_path),
            launcher=launcher,
        )
    finally:
        launcher.stop()
