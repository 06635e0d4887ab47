"""The profiler (`planner.profile`): its flags, the ITL arithmetic, and a short measurement
against the session's real tritonserver (attach mode)."""

from __future__ import annotations

import pytest

from planner.core.profile import Profile
from planner.profile.main import ProfileConfig, run
from planner.profile.measure import Plan, Prompts, Trace, measure_decode_point, steady_itl
from tests.integration.server_fixture import ServerInfo, triton_server  # noqa: F401
from trident.core.errors import ConfigError


# ---- flags -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--input-lengths", "64,abc"], "--input-lengths"),
        (["--input-lengths", "128"], "--input-lengths"),  # one length cannot make a table
        (["--contexts", "0,64"], "--contexts"),
        (["--concurrency", "1,4,4"], "--concurrency"),
        (["--decode-tokens", "3"], "--decode-tokens"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_flag_is_a_config_error_naming_it(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ProfileConfig.from_args(argv, env={})


def test_bad_list_in_the_environment_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--concurrency"):
        ProfileConfig.from_args([], env={"TRIDENT_PROFILE_CONCURRENCY": "1,,4"})


def test_flags_beat_environment_and_short_mode_fills_the_defaults() -> None:
    env = {"TRIDENT_PROFILE_CONTEXTS": "256, 64", "TRIDENT_PROFILE_REPEATS": "5"}
    config = ProfileConfig.from_args(["--short", "--repeats", "2", "--out", "/tmp/p.json"], env=env)
    plan = config.plan()
    assert config.short and config.out == "/tmp/p.json"
    assert plan.contexts == (64, 256)  # sorted
    assert plan.repeats == 2
    assert (plan.input_lengths, plan.concurrency, plan.decode_tokens) == ((32, 128), (1, 4), 12)
    full = ProfileConfig.from_args(["--short", "false"], env={}).plan()
    assert full.input_lengths == (64, 128, 256, 512, 1024) and full.concurrency == (1, 2, 4, 8, 16)
    assert (full.repeats, full.decode_tokens) == (3, 48)


# ---- ITL arithmetic ----------------------------------------------------------------------
def test_steady_itl_divides_by_tokens_and_skips_the_ramp() -> None:
    # gaps: 5 (ramp), 5 (ramp), then 1 s for 2 tokens, 0.5, 0.5
    trace = Trace(sent=0.0, times=[1.0, 6.0, 11.0, 12.0, 12.5, 13.0], tokens=[1, 1, 1, 2, 1, 1])
    assert steady_itl([trace]) == pytest.approx(0.5)


def test_steady_itl_keeps_only_gaps_while_every_stream_decodes() -> None:
    early = Trace(sent=0.0, times=[1.0, 2.0, 3.0, 4.0, 4.1, 4.2, 4.3], tokens=[1] * 7)  # fast alone
    late = Trace(sent=0.0, times=[4.0, 4.1, 4.2, 4.3, 4.5, 4.7, 4.9], tokens=[1] * 7)
    # early's gaps before 4.0 (late still prefilling) and late's after 4.3 (early done) go
    assert steady_itl([early, late]) == pytest.approx(0.1)


def test_prompts_are_fresh_and_reproducible() -> None:
    a, b = Prompts(7), Prompts(7)
    first = a(64)
    assert first == b(64) and a(64) != first and len(first) == 64


# ---- against the real server -------------------------------------------------------------
def test_short_profile_against_the_test_server(triton_server: ServerInfo, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "profile.json"
    config = ProfileConfig(grpc_url=triton_server.grpc_url, short=True, out=str(out))
    plan = config.plan()
    profile = run(config)

    assert profile.validate() is profile
    assert [p.input_tokens for p in profile.prefill] == list(plan.input_lengths)
    assert {(d.concurrency, d.context) for d in profile.decode} == {
        (c, ctx) for c in plan.concurrency for ctx in plan.contexts
    }
    ttft = {p.input_tokens: p.ttft_s for p in profile.prefill}
    assert ttft[max(ttft)] > ttft[min(ttft)], ttft
    itl = {d.concurrency: d.itl_s for d in profile.decode}
    assert itl[max(itl)] >= itl[1] * 0.8, itl
    assert profile.meta["short"] is True and profile.meta["engine"] == "torch"
    assert set(profile.meta) >= {
        "model",
        "dtype",
        "num_threads",
        "cpu_count",
        "loadavg_before",
        "loadavg_after",
        "date",
        "host",
    }
    assert Profile.load(out) == profile


def test_decode_point_straight_to_one_worker(triton_server: ServerInfo) -> None:  # noqa: F811
    plan = Plan(
        input_lengths=(16, 32), contexts=(32,), concurrency=(2,), decode_tokens=8, target="decode"
    )
    point = measure_decode_point(
        triton_server.grpc_url, plan, Prompts(1), context=32, concurrency=2
    )
    assert (point.concurrency, point.context) == (2, 32)
    assert 0 < point.itl_s < 5
