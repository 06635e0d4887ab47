"""`trident serve --prefill M`: prefill replicas from the `prefill` template, on a toy repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trident.test_launcher import TOY_CONFIG, TOY_MODEL, infer
from trident.cli import usage
from trident.core.errors import ConfigError
from trident.launcher import Launcher
from trident.serve_config import ServeConfig


def test_serve_flags_and_environment() -> None:
    config = ServeConfig.from_args(["--prefill", "2", "--disagg-threshold", "64"], env={})
    assert (config.prefill, config.disagg_threshold) == (2, 64)
    assert config.engine_env()["TRIDENT_ROUTER_DISAGG_THRESHOLD"] == "64"
    default = ServeConfig.from_args([], env={"TRIDENT_PREFILL": "1"})
    assert default.prefill == 1 and "TRIDENT_ROUTER_DISAGG_THRESHOLD" not in default.engine_env()  # router config
    assert ServeConfig(disagg_threshold=0).engine_env()["TRIDENT_ROUTER_DISAGG_THRESHOLD"] == "0"  # off


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="prefill"):
        ServeConfig(prefill=-1).validate()
    with pytest.raises(ConfigError, match="disagg_threshold"):
        ServeConfig(disagg_threshold=-2).validate()


def test_loads_prefill_replicas_from_the_prefill_template(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("decode", "prefill", "router"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(TOY_CONFIG.format(name=name))
        (repo / name / "1" / "model.py").write_text(TOY_MODEL)
    config = ServeConfig(http_port=0, grpc_port=0, metrics_port=0, decode=1, prefill=2, model_repository=str(repo),
                         server_log=str(tmp_path / "server.log"), startup_timeout_s=120)
    with Launcher(config) as launcher:
        ep = launcher.endpoints
        assert ep is not None
        assert launcher.decode_models == ["decode"] and launcher.prefill_models == ["prefill", "prefill_1"]
        assert infer(ep.http_url, "prefill_1", 1.5) == {"OUT": 3.0, "NAME": "prefill_1"}
        assert infer(ep.http_url, "prefill", 1.0)["NAME"] == "prefill"
        assert "prefill workers: prefill, prefill_1" in usage(ep, launcher)
