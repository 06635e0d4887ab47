"""The image's two scripts, run here as the container runs them: docker/entrypoint.sh (the API key
from a file into the environment, never argv) and docker/healthcheck.py (against a local HTTP
server standing in for Triton and the OpenAI frontend)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from tests.docker.deployment_files import ENTRYPOINT

SH = shutil.which("sh") or "/bin/sh"


def run_entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run(
        [SH, str(ENTRYPOINT), *command], env=full, capture_output=True, text=True, timeout=30
    )


def environment_of(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_the_key_file_becomes_the_variable_trident_serve_reads(tmp_path: Path) -> None:
    key = tmp_path / "api-key"
    key.write_text("s3cret-key\n")
    env = environment_of(run_entrypoint({"TRIDENT_API_KEY_FILE": str(key)}, "env"))
    assert env["TRIDENT_API_KEY"] == "s3cret-key"  # without the file's newline
    assert "TRIDENT_API_KEY_FILE" not in env


def test_without_a_key_file_the_command_runs_unchanged() -> None:
    result = run_entrypoint(
        {"TRIDENT_HOST": "0.0.0.0"}, "sh", "-c", 'echo "$0 $1 $TRIDENT_HOST"', "a", "b"
    )
    assert result.returncode == 0 and result.stdout == "a b 0.0.0.0\n"
    assert "TRIDENT_API_KEY" not in environment_of(run_entrypoint({}, "env"))


@pytest.mark.parametrize(
    "setup,code,message",
    [
        ("missing", 66, "not a readable file"),
        ("empty", 65, "is empty"),
        ("both", 64, "not both"),
    ],
)
def test_a_bad_key_setting_stops_before_the_command(
    tmp_path: Path, setup: str, code: int, message: str
) -> None:
    key = tmp_path / "api-key"
    env = {"TRIDENT_API_KEY_FILE": str(key)}
    if setup == "empty":
        key.write_text("\n")
    if setup == "both":
        key.write_text("a\n")
        env["TRIDENT_API_KEY"] = "b"
    result = run_entrypoint(env, "sh", "-c", "echo ran")
    assert result.returncode == code and message in result.stderr and "ran" not in result.stdout


# ---------------------------------------------------------------- healthcheck.py


class Endpoints:
    """A local server answering the health paths with the status set per path (default 200)."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.seen: list[str] = []
        endpoints = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoints.seen.append(self.path)
                self.send_response(endpoints.status.get(self.path, 200))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]


@pytest.fixture
def endpoints(monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoints]:
    ep = Endpoints()
    thread = threading.Thread(target=ep.server.serve_forever, daemon=True)
    thread.start()
    for name in [n for n in os.environ if n.startswith("TRIDENT_") or n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # must be ignored: nothing listens there
    monkeypatch.setenv("TRIDENT_HOST", "0.0.0.0")  # checked on loopback
    monkeypatch.setenv("TRIDENT_HTTP_PORT", str(ep.port))
    monkeypatch.setenv("TRIDENT_OPENAI_PORT", str(ep.port))
    try:
        yield ep
    finally:
        ep.server.shutdown()
        ep.server.server_close()


def test_ready_when_triton_the_router_and_the_frontend_are(
    endpoints: Endpoints, healthcheck: ModuleType
) -> None:
    assert healthcheck.main() == 0
    assert endpoints.seen == ["/v2/health/ready", "/v2/models/router/ready", "/health/ready"]


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/models/router/ready", "/health/ready"])
def test_not_ready_when_one_is_not(
    endpoints: Endpoints, healthcheck: ModuleType, path: str, capsys
) -> None:
    endpoints.status[path] = 503 if path != "/v2/models/router/ready" else 400
    assert healthcheck.main() == 1
    assert path in capsys.readouterr().err


def test_the_frontend_is_skipped_when_it_is_off(
    endpoints: Endpoints, healthcheck: ModuleType, monkeypatch
) -> None:
    monkeypatch.setenv("TRIDENT_OPENAI_PORT", "-1")
    endpoints.status["/health/ready"] = 503
    assert healthcheck.main() == 0 and "/health/ready" not in endpoints.seen


def test_not_ready_when_nothing_listens(
    endpoints: Endpoints, healthcheck: ModuleType, monkeypatch, capsys
) -> None:
    endpoints.server.shutdown()
    endpoints.server.server_close()  # the port is free now
    assert healthcheck.main() == 1
    assert "/v2/health/ready" in capsys.readouterr().err


def test_a_bad_setting_is_not_ready(
    endpoints: Endpoints, healthcheck: ModuleType, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("TRIDENT_HTTP_PORT", "eighty")
    assert healthcheck.main() == 1
    assert "http_port" in capsys.readouterr().err


# A worker node of the cluster (docker/k8s/cluster: decode.yaml, prefill.yaml) runs no router and
# no frontend: its readiness is its own workers. Its host is the pod IP, not a wildcard.
WORKER_NODE = {
    "TRIDENT_ROLE": "worker",
    "TRIDENT_NODE_NAME": "trident-prefill-0",
    "TRIDENT_NODE_ADDRESS": "127.0.0.1",
    "TRIDENT_HOST": "127.0.0.1",
    "TRIDENT_ETCD": "http://127.0.0.1:9",  # read by the workers, never by the check
    "TRIDENT_DECODE": "1",
    "TRIDENT_PREFILL": "1",
}
WORKER_CHECKS = ["/v2/health/ready", "/v2/models/decode/ready", "/v2/models/prefill/ready"]


def test_a_worker_node_is_ready_with_its_workers_without_router_or_frontend(
    endpoints: Endpoints, healthcheck: ModuleType, monkeypatch
) -> None:
    for name, value in WORKER_NODE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TRIDENT_OPENAI_PORT", "0")  # no frontend here: its port does not matter
    endpoints.status["/v2/models/router/ready"] = 400  # not loaded on a worker node
    endpoints.status["/health/ready"] = 503
    assert healthcheck.main() == 0
    assert endpoints.seen == WORKER_CHECKS


def test_a_worker_node_checks_every_replica_it_loads(
    endpoints: Endpoints, healthcheck: ModuleType, monkeypatch
) -> None:
    for name, value in {**WORKER_NODE, "TRIDENT_DECODE": "2", "TRIDENT_PREFILL": "0"}.items():
        monkeypatch.setenv(name, value)
    assert healthcheck.main() == 0
    assert endpoints.seen == [
        "/v2/health/ready",
        "/v2/models/decode/ready",
        "/v2/models/decode_1/ready",
    ]


@pytest.mark.parametrize("path", WORKER_CHECKS)
def test_a_worker_node_is_not_ready_until_each_check_passes(
    endpoints: Endpoints, healthcheck: ModuleType, monkeypatch, path: str, capsys
) -> None:
    for name, value in WORKER_NODE.items():
        monkeypatch.setenv(name, value)
    endpoints.status[path] = 503 if path == "/v2/health/ready" else 400
    assert healthcheck.main() == 1
    assert path in capsys.readouterr().err


def test_a_router_only_node_needs_the_router_and_a_live_frontend(
    endpoints: Endpoints, healthcheck: ModuleType, monkeypatch, capsys
) -> None:
    """With every worker on other nodes the frontend's /health/ready (this server's workers)
    never passes, so its /health/live is what is checked (docker/k8s/cluster/router.yaml)."""
    monkeypatch.setenv("TRIDENT_ROLE", "router")
    monkeypatch.setenv("TRIDENT_DECODE", "0")
    monkeypatch.setenv("TRIDENT_ETCD", "http://127.0.0.1:9")
    endpoints.status["/health/ready"] = 503
    assert healthcheck.main() == 0
    assert endpoints.seen == ["/v2/health/ready", "/v2/models/router/ready", "/health/live"]
    endpoints.status["/health/live"] = 503
    assert healthcheck.main() == 1
    assert "/health/live" in capsys.readouterr().err
