"""The planner's settings: `PlannerConfig` from flags and `TRIDENT_PLANNER_*` variables
(`planner.main.parse_args`, `trident.core.flags`), its `validate()`, the model-repository key
(a file or the environment, never a flag), and how the run directory is found."""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest

from planner.config import ADMIN_KEY_ENV, ENV_PREFIX, PlannerConfig
from planner.main import find_run_dir, parse_args
from trident.core.errors import ConfigError
from trident.core.settings import coerce
from trident.serve_config import ServeConfig

# A valid value other than the default for every field, with what else it needs to validate.
OTHER: dict[str, tuple[str, dict[str, str]]] = {
    "mode": ("sla", {"profile": "/profiles/p.json"}),
    "ttft_target_ms": ("500", {}),
    "itl_target_ms": ("50", {}),
    "headroom": ("0.5", {}),
    "interval_s": ("10", {}),
    "scrape_s": ("2", {}),
    "min_decode": ("2", {}),
    "max_decode": ("8", {}),
    "min_prefill": ("1", {"max_prefill": "2"}),
    "max_prefill": ("2", {}),
    "budget": ("16", {}),
    "worker_cost": ("2", {}),
    "up_cooldown_s": ("5", {}),
    "down_cooldown_s": ("60", {}),
    "down_windows": ("5", {}),
    "down_margin": ("0.5", {}),
    "profile": ("/profiles/p.json", {}),
    "forecast": ("constant", {}),
    "forecast_windows": ("3", {}),
    "connector": ("advisory", {}),
    "url": ("http://10.0.0.2:8000", {}),
    "metrics_url": ("http://10.0.0.2:8002/metrics", {}),
    "admin_key_file": ("/secrets/key", {}),
    "model_repository": ("/srv/model_repository", {}),
    "run_dir": ("/run/trident", {}),
    "drain_timeout_s": ("30", {}),
    "load_timeout_s": ("60", {}),
    "device": ("cuda", {}),
    "k8s_namespace": ("serving", {}),
    "k8s_workloads": ("decode=statefulset/trident-decode", {}),
    "log_level": ("debug", {}),
    "exporter_host": ("0.0.0.0", {}),
    "exporter_port": ("9400", {}),
}
FIELDS = [f.name for f in fields(PlannerConfig)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


# ---- flags and environment ----------------------------------------------------------------
def test_defaults_without_flags_or_environment() -> None:
    assert parse_args([], env={}) == PlannerConfig()


def test_every_field_has_another_value_in_this_test() -> None:
    assert set(OTHER) == set(FIELDS), "add the new field to OTHER"


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_has_a_flag(name: str) -> None:
    value, needs = OTHER[name]
    argv = [flag(name), value]
    for other, v in needs.items():
        argv += [flag(other), v]
    config = parse_args(argv, env={})
    expected = coerce(name, next(f.type for f in fields(PlannerConfig) if f.name == name), value)
    assert getattr(config, name) == expected != getattr(PlannerConfig(), name)


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_has_an_environment_variable(name: str) -> None:
    value, needs = OTHER[name]
    env = {env_var(name): value, **{env_var(other): v for other, v in needs.items()}}
    config = parse_args([], env=env)
    expected = coerce(name, next(f.type for f in fields(PlannerConfig) if f.name == name), value)
    assert getattr(config, name) == expected != getattr(PlannerConfig(), name)


def test_flag_beats_environment_which_beats_default() -> None:
    env = {"TRIDENT_PLANNER_ITL_TARGET_MS": "70", "TRIDENT_PLANNER_MAX_DECODE": "6", "TRIDENT_PLANNER_MODE": ""}
    config = parse_args(["--itl-target-ms", "50"], env=env)
    assert config.itl_target_ms == 50.0  # flag
    assert config.max_decode == 6  # environment
    assert config.ttft_target_ms == 1000.0  # default
    assert config.mode == "load"  # an empty variable is unset


def test_a_bad_flag_value_exits_with_the_fields_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--mode", "guess"], env={})
    assert exc.value.code == 2
    assert "mode must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([], env={"TRIDENT_PLANNER_MIN_DECODE": "two"})
    assert "min_decode: cannot parse 'two' as int" in capsys.readouterr().err


# ---- validate -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "guess"}, "^mode must be one of"),
        ({"connector": "ssh"}, "^connector must be one of"),
        ({"forecast": "oracle"}, "^forecast must be one of"),
        ({"device": "tpu"}, "^device must be one of"),
        ({"log_level": "loud"}, "^log_level must be one of"),
        ({"itl_target_ms": 0.0}, "^itl_target_ms must be positive"),
        ({"headroom": 1.5}, r"^headroom must be in \(0, 1\]"),
        ({"down_margin": 0.0}, r"^down_margin must be in \(0, 1\]"),
        ({"budget": -1.0}, "^budget must be >= 0"),
        ({"min_decode": 3, "max_decode": 2}, "min_decode <= max_decode, got 3, 2"),
        ({"min_decode": 0}, "min_decode <= max_decode, got 0, 4"),
        ({"min_prefill": 2, "max_prefill": 1}, "min_prefill <= max_prefill, got 2, 1"),
        ({"down_windows": 0}, "down_windows must be >= 1"),
        ({"forecast_windows": 1}, "forecast_windows must be >= 2"),
        ({"mode": "sla"}, "mode sla needs --profile"),
        ({"connector": "kubernetes"}, "connector kubernetes needs --k8s-workloads"),
        ({"scrape_s": 6.0, "interval_s": 5.0}, r"scrape_s \(6.0\) must not exceed interval_s \(5.0\)"),
    ],
)
def test_validate_names_the_bad_field(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PlannerConfig(**changes).validate()


def test_validate_returns_the_config_when_it_is_good() -> None:
    config = PlannerConfig(mode="sla", profile="p.json", connector="kubernetes", k8s_workloads="decode=deployment/d",
                           scrape_s=5.0, interval_s=5.0, min_prefill=0, max_prefill=2)
    assert config.validate() is config
    assert config.pools == ("decode", "prefill")
    assert PlannerConfig().pools == ("decode",)


# ---- the model-repository key -------------------------------------------------------------
def test_admin_key_from_a_file_without_its_newline(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text("k3y-from-file\n")
    config = PlannerConfig(admin_key_file=str(key_file))
    assert config.admin_key(env={}) == "k3y-from-file"
    assert config.admin_key(env={ADMIN_KEY_ENV: "k3y-from-env"}) == "k3y-from-file"  # the file wins


def test_admin_key_from_the_environment() -> None:
    assert ADMIN_KEY_ENV == "TRIDENT_PLANNER_ADMIN_KEY"
    assert PlannerConfig().admin_key(env={"TRIDENT_PLANNER_ADMIN_KEY": " k3y-from-env\n"}) == "k3y-from-env"
    assert PlannerConfig().admin_key(env={}) == ""


def test_admin_key_from_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_KEY_ENV, "k3y-in-os-environ")
    assert PlannerConfig().admin_key() == "k3y-in-os-environ"


def test_admin_key_file_that_cannot_be_read_names_the_setting(tmp_path: Path) -> None:
    config = PlannerConfig(admin_key_file=str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="^admin_key_file: cannot read .*missing.key"):
        config.admin_key(env={ADMIN_KEY_ENV: "unused"})


def test_admin_key_environment_variable_is_not_a_setting() -> None:
    config = parse_args([], env={ADMIN_KEY_ENV: "k3y"})
    assert config == PlannerConfig()  # read only by admin_key(), never stored in the config


@pytest.mark.parametrize("argv", [["--admin-key", "s3cret"], ["--admin-key=s3cret"], ["--admin", "s3cret"]])
def test_there_is_no_flag_for_the_key_itself(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A key on the command line would show in `ps`; not even an abbreviation of
    `--admin-key-file` may take one."""
    with pytest.raises(SystemExit):
        parse_args(argv, env={})
    assert "unrecognized arguments" in capsys.readouterr().err


# ---- the run directory --------------------------------------------------------------------
@pytest.fixture
def tmpdir_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The per-user base of server run directories, under this test's tmp_path."""
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    return tmp_path / f"trident-kv-{os.getuid()}"


def test_run_dir_flag_wins(tmpdir_base: Path) -> None:
    config = PlannerConfig(run_dir="/srv/run")
    assert find_run_dir(config, env={"TRIDENT_KV_EVENTS_DIR": "/elsewhere"}) == Path("/srv/run")


def test_run_dir_expands_the_home_directory(tmpdir_base: Path) -> None:
    assert find_run_dir(PlannerConfig(run_dir="~/run"), env={}) == Path("~/run").expanduser()


def test_run_dir_from_the_servers_environment_variable(tmpdir_base: Path) -> None:
    assert find_run_dir(PlannerConfig(), env={"TRIDENT_KV_EVENTS_DIR": "/run/events"}) == Path("/run/events")


def test_run_dir_found_when_this_user_has_one_server(tmpdir_base: Path) -> None:
    (tmpdir_base / "server-4242").mkdir(parents=True)
    (tmpdir_base / "unrelated").mkdir()
    assert find_run_dir(PlannerConfig(), env={}) == tmpdir_base / "server-4242"


@pytest.mark.parametrize("servers", [0, 2])
def test_run_dir_error_when_none_or_several_servers(tmpdir_base: Path, servers: int) -> None:
    tmpdir_base.mkdir()
    for pid in range(servers):
        (tmpdir_base / f"server-{1000 + pid}").mkdir()
    with pytest.raises(ConfigError, match=rf"^run_dir: .*\({servers} under .*pass --run-dir or set TRIDENT_KV_EVENTS_DIR"):
        find_run_dir(PlannerConfig(), env={})


def test_run_dir_error_when_the_base_does_not_exist(tmpdir_base: Path) -> None:
    with pytest.raises(ConfigError, match=r"^run_dir: .*\(0 under "):
        find_run_dir(PlannerConfig(), env={})


def test_run_dir_reads_os_environ_by_default(tmpdir_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIDENT_KV_EVENTS_DIR", "/run/from-os-environ")
    assert find_run_dir(PlannerConfig()) == Path("/run/from-os-environ")


# ---- bool flags (trident.core.flags) ------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "env", "planner"),
    [
        (["--planner"], {}, True),
        (["--planner", "false"], {}, False),
        (["--planner", "true"], {}, True),
        (["--planner=no"], {}, False),
        ([], {}, False),
        ([], {"TRIDENT_PLANNER": "1"}, True),
        (["--planner", "off"], {"TRIDENT_PLANNER": "1"}, False),
    ],
)
def test_a_bool_field_is_a_bare_switch_or_takes_a_value(argv: list[str], env: dict[str, str], planner: bool) -> None:
    assert ServeConfig.from_args(argv, env=env).planner is planner


def test_a_bare_switch_does_not_swallow_the_next_flag() -> None:
    config = ServeConfig.from_args(["--planner", "--decode", "2"], env={})
    assert config.planner is True and config.decode == 2


def test_a_bool_flag_with_a_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="^planner: cannot parse 'maybe' as bool"):
        ServeConfig.from_args(["--planner", "maybe"], env={})
