"""A plain `tritonserver --model-repository model_repository` (no launcher) serves the default model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.helpers import CHAT_FRANCE
from trident.launcher import (
    ENGINE_SHM_PREFIX,
    REPO_ROOT,
    free_port,
    group_pids,
    locate_tritonserver,
    prepare_install,
    remove_shm_regions,
)

MODELS = ("router", "decode", "prefill")  # everything in model_repository/


def test_plain_tritonserver_serves_the_default_model(tmp_path: Path) -> None:
    install = prepare_install(locate_tritonserver(""))  # the wheel needs the stub copied; NGC does not
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    shm_prefix = f"trident_plain_test_{os.getpid()}_"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIDENT_") and k != "PYTHONPATH"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # an activated venv
        LD_LIBRARY_PATH=os.pathsep.join(str(p) for p in install.lib_dirs),
        TRIDENT_KV_CACHE_MB="64",  # small engines for the 2-core CI machine
        TRIDENT_NUM_THREADS="1",
    )
    cmd = [
        str(install.binary), f"--model-repository={REPO_ROOT / 'model_repository'}",
        f"--backend-directory={install.backend_dir}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
        f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
        # the default model-control mode ("none"): tritonserver loads every model it finds
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",  # only so the test can clean up
    ]
    log = open(tmp_path / "tritonserver.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if all(httpx.get(f"{url}/v2/models/{m}/ready").status_code == 200 for m in MODELS):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {"messages": CHAT_FRANCE, "max_tokens": 24, "temperature": 0}
        resp = httpx.post(f"{url}/v2/models/router/generate", json=body, timeout=120)
        assert resp.status_code == 200, (resp.text, (tmp_path / "tritonserver.log").read_text()[-3000:])
        assert "Paris" in resp.json()["text_output"]
        assert resp.json()["worker"] == "decode"  # a short prompt is prefilled where it decodes
    finally:
        stubs = group_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        deadline = time.monotonic() + 10
        while group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = group_pids(proc.pid)
        if leftovers:  # a crashed server leaves its stubs behind: do not leak them into the machine
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in stubs:
            remove_shm_regions(f"{ENGINE_SHM_PREFIX}{pid}_")
        remove_shm_regions(shm_prefix)
    assert proc.returncode == 0, (tmp_path / "tritonserver.log").read_text()[-3000:]
    assert leftovers == set(), "the stubs exit with the server"
