from __future__ import annotations

import pytest

from trident.core.errors import ConfigError
from trident.serve_config import ServeConfig


def test_defaults_bind_localhost() -> None:
    config = ServeConfig.from_args([], env={})
    assert config == ServeConfig()
    assert config.host == "127.0.0.1" and (config.http_port, config.grpc_port, config.metrics_port) == (8000, 8001, 8002)


def test_flags_beat_env_which_beats_defaults() -> None:
    env = {"TRIDENT_DECODE": "3", "TRIDENT_KV_CACHE_MB": "128", "TRIDENT_HTTP_PORT": "9000", "TRIDENT_LOG_LEVEL": ""}
    config = ServeConfig.from_args(["--decode", "2", "--num-threads", "1", "--dtype", "float32"], env=env)
    assert config.decode == 2  # flag
    assert config.kv_cache_mb == 128 and config.http_port == 9000  # env
    assert config.num_threads == 1 and config.dtype == "float32"
    assert config.log_level == "info"  # empty env var = unset


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--decode", "0"], {}, "decode must be >= 1"),
        (["--http-port", "70000"], {}, "http_port"),
        (["--dtype", "int8"], {}, "dtype"),
        (["--log-level", "loud"], {}, "log_level"),
        ([], {"TRIDENT_KV_CACHE_MB": "lots"}, "kv_cache_mb: cannot parse"),
        (["--device", "tpu"], {}, "device"),
        (["--engine", "sglang"], {}, "engine must be one of"),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_args(argv, env=env)


def test_engine_env_exports_only_what_was_set(tmp_path) -> None:
    assert ServeConfig().engine_env() == {"TRIDENT_LOG_LEVEL": "info"}
    env = ServeConfig(model=str(tmp_path), dtype="bfloat16", kv_cache_mb=64, num_threads=1, device="cuda").engine_env()
    assert env == {
        "TRIDENT_LOG_LEVEL": "info",
        "TRIDENT_MODEL": str(tmp_path),
        "TRIDENT_DTYPE": "bfloat16",
        "TRIDENT_DEVICE": "cuda",
        "TRIDENT_KV_CACHE_MB": "64",
        "TRIDENT_NUM_THREADS": "1",
    }


def test_vllm_engine_sets_the_routers_block_size() -> None:
    env = ServeConfig.from_args(["--engine", "vllm", "--decode", "2"], env={}).engine_env()
    assert env["TRIDENT_ENGINE"] == "vllm" and env["TRIDENT_ROUTER_BLOCK_SIZE"] == "32"
    assert "TRIDENT_ROUTER_BLOCK_SIZE" not in ServeConfig(engine="torch").engine_env()


def test_engine_names_and_vllm_block_size_match_the_plugins() -> None:
    from plugins.triton.engines import ENGINES
    from plugins.vllm.config import VllmEngineConfig
    from trident import serve_config

    assert serve_config.ENGINES == ENGINES
    assert serve_config.VLLM_BLOCK_SIZE == VllmEngineConfig().block_size
