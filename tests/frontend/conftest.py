"""Fixtures of the frontend tests.

Unit tests build the real app on a closed Triton port (no server needed). End-to-end
tests use `frontend_server`: the real frontend (uvicorn, on a free port, in a thread of
the test process) in front of the session's real tritonserver from
`tests/integration/server_fixture.py`. A frontend is cheap; Triton is started only once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from frontend.args import FrontendConfig
from frontend.main import BackgroundFrontend, serve_in_thread
from tests.integration.server_fixture import ServerInfo

MODEL_ID = "SmolLM2-135M-Instruct"
API_KEY = "e2e-secret"


def start_frontend(server: ServerInfo, **overrides: object) -> BackgroundFrontend:
    config = FrontendConfig(
        port=0,
        triton_url=server.grpc_url,
        model_names=(MODEL_ID,),
        log_level="warning",
        **overrides,  # type: ignore[arg-type]
    )
    return serve_in_thread(config)


@pytest.fixture(scope="session")
def frontend_server(triton_server: ServerInfo) -> Iterator[BackgroundFrontend]:
    frontend = start_frontend(triton_server)
    try:
        yield frontend
    finally:
        frontend.stop()


@pytest.fixture(scope="session")
def keyed_frontend(triton_server: ServerInfo) -> Iterator[BackgroundFrontend]:  # noqa: F811
    frontend = start_frontend(triton_server, api_key=API_KEY)
    try:
        yield frontend
    finally:
        frontend.stop()


LIMITED = {"max_streams_per_key": 2, "max_body_bytes": 4096}


@pytest.fixture(scope="session")
def limited_frontend(triton_server: ServerInfo) -> Iterator[BackgroundFrontend]:  # noqa: F811
    """A keyed frontend with small limits (`LIMITED`), for tests/frontend/test_limits.py."""
    frontend = start_frontend(triton_server, api_key=API_KEY, **LIMITED)
    try:
        yield frontend
    finally:
        frontend.stop()


@pytest.fixture(scope="session")
def base_url(frontend_server: BackgroundFrontend) -> str:
    return frontend_server.base_url
