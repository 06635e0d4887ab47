"""FrontendConfig: flags beat env vars beat defaults; bad values name the setting."""

from __future__ import annotations

import pytest

from frontend.args import FrontendConfig, parse_args
from trident.core.errors import ConfigError


def test_defaults() -> None:
    cfg = parse_args([], env={})
    assert cfg == FrontendConfig()
    assert (cfg.host, cfg.port, cfg.api_key) == ("127.0.0.1", 9000, None)


def test_env_then_flags() -> None:
    env = {
        "TRIDENT_FRONTEND_PORT": "9100",
        "TRIDENT_FRONTEND_API_KEY": "sekrit",
        "TRIDENT_FRONTEND_MODEL_NAMES": "a, b",
        "TRIDENT_FRONTEND_TRITON_URL": "localhost:7001",
    }
    cfg = parse_args(["--port", "9200", "--default-max-tokens", "64"], env=env)
    assert cfg.port == 9200 and cfg.api_key == "sekrit" and cfg.model_names == ("a", "b")
    assert cfg.triton_url == "localhost:7001" and cfg.default_max_tokens == 64


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--port", "x"], "port"),
        (["--port", "70000"], "port"),
        (["--triton-url", "nohostport"], "triton_url"),
        (["--max-n", "0"], "max_n"),
        (["--default-max-tokens", "-3"], "default_max_tokens"),
        (["--log-level", "loud"], "log_level"),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_args(argv, env={})
