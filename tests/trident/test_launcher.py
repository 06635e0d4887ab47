"""The launcher against the real tritonserver, on a toy repository (no engine: fast)."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from trident.core.errors import ConfigError, TridentError
from trident.launcher import (
    SHM_DIR,
    STUB_NAME,
    Launcher,
    group_pids,
    locate_tritonserver,
    prepare_install,
    remove_shm_regions,
)
from trident.model_control import ModelControl
from trident.serve_config import ServeConfig

TOY_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.name = args["model_name"]

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            name = np.array([self.name.encode()], dtype=np.object_)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2), pb_utils.Tensor("NAME", name)]))
        return out
'''
TOY_CONFIG = '''
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] }}, {{ name: "NAME" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
'''


@pytest.fixture()
def toy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for name in ("decode", "router"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(TOY_CONFIG.format(name=name))
        (repo / name / "1" / "model.py").write_text(TOY_MODEL)
    return repo


def toy_config(repo: Path, tmp_path: Path, decode: int = 2) -> ServeConfig:
    return ServeConfig(
        http_port=0, grpc_port=0, metrics_port=0, decode=decode, model_repository=str(repo),
        server_log=str(tmp_path / "server.log"), startup_timeout_s=120,
    )


def infer(http_url: str, model: str, value: float) -> dict:
    body = {"inputs": [{"name": "IN", "shape": [1], "datatype": "FP32", "data": [value]}]}
    req = urllib.request.Request(f"{http_url}/v2/models/{model}/infer", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return {o["name"]: o["data"][0] for o in json.loads(resp.read())["outputs"]}


def test_locate_explicit_path_and_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an executable"):
        locate_tritonserver(str(tmp_path / "missing"))
    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert locate_tritonserver(str(fake.parent)) == fake.resolve()
    assert locate_tritonserver("", env={"PATH": str(fake.parent)}) == fake.resolve()  # PATH first
    wheel = locate_tritonserver("", env={"PATH": str(tmp_path)})  # then NGC, then the wheel
    assert wheel.name == "tritonserver" and wheel.is_file()


def test_prepare_install_copies_the_stub_into_a_cache(tmp_path: Path) -> None:
    binary = locate_tritonserver("", env={"PATH": ""})
    install = prepare_install(binary, cache_dir=tmp_path)
    python_dir = install.backend_dir / "python"
    assert str(install.backend_dir).startswith(str(tmp_path))
    assert (python_dir / STUB_NAME).is_file() and (python_dir / "libtriton_python.so").is_file()
    assert any(p.name == "nvidia_pytriton.libs" for p in install.lib_dirs)
    assert prepare_install(binary, cache_dir=tmp_path) == install  # reused


def test_prepare_install_uses_an_ngc_layout_as_is(tmp_path: Path) -> None:
    root = tmp_path / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "backends" / "python").mkdir(parents=True)
    (root / "backends" / "python" / STUB_NAME).write_text("")
    (root / "bin" / "tritonserver").write_text("")
    assert prepare_install(root / "bin" / "tritonserver").backend_dir == root / "backends"


def test_remove_shm_regions_only_touches_its_prefix() -> None:
    mine, other = SHM_DIR / "trident_test_prefix_a", SHM_DIR / "trident_test_other_a"
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    try:
        assert remove_shm_regions("trident_test_prefix_") == ["trident_test_prefix_a"]
        assert not mine.exists() and other.exists()
    finally:
        other.unlink(missing_ok=True)


def test_serves_replicas_restricts_model_control_and_stops_cleanly(toy_repo: Path, tmp_path: Path) -> None:
    launcher = Launcher(toy_config(toy_repo, tmp_path))
    try:
        ep = launcher.start()
        assert launcher.decode_models == ["decode", "decode_1"]
        assert infer(ep.http_url, "decode_1", 1.5) == {"OUT": 3.0, "NAME": "decode_1"}  # file override
        assert infer(ep.http_url, "router", 2.0)["OUT"] == 4.0
        with pytest.raises(TridentError, match="index"):
            ModelControl(ep.http_url).index()  # no key: refused
        control = ModelControl(ep.http_url, launcher.key)
        # The index lists only directories of the repository, not replicas made by override.
        assert {m["name"] for m in control.index(ready_only=True)} == {"decode", "router"}
        assert control.is_ready("decode_1")
        pgid = launcher._proc.pid  # type: ignore[union-attr]
        assert len(group_pids(pgid)) >= 4  # the server and three stubs
        assert list(SHM_DIR.glob(launcher.shm_prefix + "*"))
    finally:
        launcher.stop()
    assert group_pids(pgid) == set()
    assert not list(SHM_DIR.glob(launcher.shm_prefix + "*"))
    launcher.stop()  # twice is fine


def test_cleans_up_after_the_server_is_killed(toy_repo: Path, tmp_path: Path) -> None:
    launcher = Launcher(toy_config(toy_repo, tmp_path, decode=1))
    launcher.start()
    pgid = launcher._proc.pid  # type: ignore[union-attr]
    os.kill(pgid, signal.SIGKILL)
    time.sleep(0.5)
    assert list(SHM_DIR.glob(launcher.shm_prefix + "*")), "a killed server leaves its regions behind"
    launcher.stop()
    assert group_pids(pgid) == set()
    assert not list(SHM_DIR.glob(launcher.shm_prefix + "*"))


def test_a_failing_model_reports_the_server_log(toy_repo: Path, tmp_path: Path) -> None:
    (toy_repo / "router" / "1" / "model.py").write_text("raise RuntimeError('router is broken')\n")
    launcher = Launcher(toy_config(toy_repo, tmp_path, decode=1))
    with pytest.raises(TridentError, match="router is broken"):
        launcher.start()
    assert not launcher.is_running()
    assert not list(SHM_DIR.glob(launcher.shm_prefix + "*"))


def test_restricted_api_rejects_a_load_without_the_key(toy_repo: Path, tmp_path: Path) -> None:
    launcher = Launcher(toy_config(toy_repo, tmp_path, decode=1))
    try:
        ep = launcher.start()
        body = json.dumps({}).encode()
        req = urllib.request.Request(f"{ep.http_url}/v2/repository/models/decode/unload", data=body)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code in (400, 401, 403)
        assert ModelControl(ep.http_url, launcher.key).is_ready("decode")
    finally:
        launcher.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_trident_serve_stops_cleanly_on_a_signal(toy_repo: Path, tmp_path: Path, sig: signal.Signals) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "trident", "serve", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
           "--model-repository", str(toy_repo), "--server-log", str(tmp_path / "server.log")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
    assert any("/v2/models/router/generate_stream" in line for line in lines), lines
    server_pid = int(next(line for line in lines if "started tritonserver (pid" in line).split("pid ")[1].split(",")[0])
    assert group_pids(server_pid)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    assert group_pids(server_pid) == set()
    assert not list(SHM_DIR.glob(f"triton_python_backend_shm_region_trident{proc.pid}x*"))
