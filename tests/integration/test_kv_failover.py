"""A decode worker that dies mid-request: the request ends with an error naming it, new
requests go to the other worker, nothing hangs. Uses its own server (it kills a worker)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from trident.launcher import Launcher, group_pids
from trident.router_client import RouterClient
from trident.serve_config import ServeConfig


def _stub_pid(launcher: Launcher, worker: str) -> int:
    assert launcher._proc is not None
    for pid in group_pids(launcher._proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "triton_python_backend_stub" in cmdline and f" {worker}_0_0 " in cmdline:
            return pid
    raise AssertionError(f"no stub process for {worker}")


def test_worker_killed_mid_request(tmp_path: Path) -> None:
    config = ServeConfig(
        http_port=0, grpc_port=0, metrics_port=0, decode=2, kv_cache_mb=32, num_threads=1,
        server_log=str(tmp_path / "tritonserver.log"),
    )
    launcher = Launcher(config)
    ep = launcher.start()
    try:
        client = RouterClient(ep.grpc_url)
        stream = client.stream(text_input="Tell me a long story.", max_tokens=4000, ignore_eos=True, stream=True)
        first = next(stream)
        worker = first["worker"]
        os.kill(_stub_pid(launcher, worker), signal.SIGKILL)
        started = time.monotonic()
        outcome: dict[str, object] = {}

        def drain() -> None:
            try:
                for _ in stream:
                    pass
                outcome["finished"] = True
            except InferenceServerException as exc:
                outcome["error"] = str(exc)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), "the request hangs"
        assert f"worker {worker} went away" in str(outcome.get("error")), outcome
        assert time.monotonic() - started < 15
        client.close()
        other = next(w for w in launcher.decode_models if w != worker)
        with RouterClient(ep.grpc_url) as again:
            workers = {again.generate(text_input=f"Hello {i}", max_tokens=2)[-1]["worker"] for i in range(4)}
        assert workers == {other}
    except Exception:
        if launcher.log_path is not None:
            print(Path(launcher.log_path).read_text()[-4000:])
        raise
    finally:
        launcher.stop(grace_s=5.0)


pytestmark = pytest.mark.timeout(300)
