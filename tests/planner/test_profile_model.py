"""The profile model (`planner.core.profile`): interpolation and extrapolation of the TTFT
and ITL tables, the monotone fix against noisy points, the capacity arithmetic against
hand-computed values, and the JSON file with its validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.core.profile import VERSION, DecodePoint, PrefillPoint, Profile
from trident.core.errors import ConfigError

PREFILL = (PrefillPoint(100, 0.10), PrefillPoint(200, 0.15), PrefillPoint(400, 0.35))
DECODE = (
    DecodePoint(1, 512, 0.020), DecodePoint(4, 512, 0.030), DecodePoint(8, 512, 0.050),
    DecodePoint(1, 2048, 0.030), DecodePoint(4, 2048, 0.045), DecodePoint(8, 2048, 0.080),
)


def profile(prefill=PREFILL, decode=DECODE, **meta) -> Profile:
    return Profile(tuple(prefill), tuple(decode), meta).validate()


# ---- prefill ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("isl", "ttft"),
    [
        (100, 0.10), (200, 0.15), (400, 0.35),  # measured points
        (150, 0.125), (300, 0.25),  # between them
        (800, 0.75),  # beyond: the last segment's slope (0.2 s / 200 tokens)
        (50, 0.075),  # below: the first segment's slope (0.05 s / 100 tokens)
    ],
)
def test_ttft_interpolates_and_extrapolates_linearly(isl: float, ttft: float) -> None:
    assert profile().ttft(isl) == pytest.approx(ttft)


def test_ttft_below_the_table_is_at_least_half_the_smallest_point() -> None:
    steep = profile(prefill=(PrefillPoint(100, 0.1), PrefillPoint(200, 0.3)))
    assert steep.ttft(20) == pytest.approx(0.05)  # the line would say -0.06 s
    assert steep.ttft(0) == steep.ttft(1) == pytest.approx(0.05)  # lengths under one token count as one


def test_a_noisy_faster_point_at_a_longer_prompt_does_not_make_it_faster() -> None:
    noisy = profile(prefill=(PrefillPoint(100, 0.10), PrefillPoint(200, 0.08), PrefillPoint(400, 0.30)))
    assert noisy.ttft(200) == pytest.approx(0.10)
    assert noisy.ttft(150) == pytest.approx(0.10)
    assert noisy.ttft(300) == pytest.approx(0.20)
    lengths = range(1, 1000, 7)
    ttfts = [noisy.ttft(n) for n in lengths]
    assert ttfts == sorted(ttfts)


def test_prefill_capacity_is_tokens_over_ttft() -> None:
    assert profile().prefill_capacity(200) == pytest.approx(200 / 0.15)
    assert profile().prefill_capacity(0) == pytest.approx(1 / profile().ttft(1))


def test_repeated_prefill_points_are_averaged() -> None:
    p = profile(prefill=(PrefillPoint(100, 0.08), PrefillPoint(100, 0.12), PrefillPoint(200, 0.2)))
    assert p.ttft(100) == pytest.approx(0.10)
    assert p.ttft(150) == pytest.approx(0.15)


# ---- decode -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("concurrency", "context", "itl"),
    [
        (1, 512, 0.020), (4, 512, 0.030), (8, 2048, 0.080),  # measured points
        (2, 512, 0.020 + 0.010 / 3), (6, 512, 0.040),  # between concurrencies
        (16, 512, 0.090),  # beyond: 0.005 s per request more
        (4, 1280, 0.0375),  # between contexts
        (4, 3584, 0.060),  # beyond the longest context
        (4, 256, 0.0275),  # below the shortest context
        (0.5, 512, 0.020),  # under one request counts as one
    ],
)
def test_itl_interpolates_over_concurrency_then_context(concurrency: float, context: float, itl: float) -> None:
    assert profile().itl(concurrency, context) == pytest.approx(itl)


def test_a_noisy_faster_point_at_higher_concurrency_does_not_make_it_faster() -> None:
    noisy = profile(decode=(DecodePoint(1, 512, 0.020), DecodePoint(4, 512, 0.018), DecodePoint(8, 512, 0.050)))
    assert noisy.itl(4, 512) == pytest.approx(0.020)
    assert noisy.itl(2, 512) == pytest.approx(0.020)
    assert noisy.itl(6, 512) == pytest.approx(0.035)
    itls = [noisy.itl(c / 4, 512) for c in range(1, 64)]
    assert itls == sorted(itls)


def test_a_noisy_faster_longer_context_does_not_make_it_faster() -> None:
    noisy = profile(decode=(DecodePoint(1, 512, 0.030), DecodePoint(4, 512, 0.040),
                            DecodePoint(1, 2048, 0.025), DecodePoint(4, 2048, 0.060)))
    assert noisy.itl(1, 2048) == pytest.approx(0.030)
    assert noisy.itl(1, 1024) == pytest.approx(0.030)
    assert noisy.itl(4, 1280) == pytest.approx(0.050)


def test_one_measured_context_serves_every_context() -> None:
    p = profile(decode=(DecodePoint(1, 512, 0.02), DecodePoint(4, 512, 0.03)))
    assert p.itl(4, 64) == p.itl(4, 512) == p.itl(4, 8192) == pytest.approx(0.03)


def test_one_decode_point_scales_with_concurrency() -> None:
    p = profile(decode=(DecodePoint(1, 512, 0.02),))
    assert p.itl(1, 512) == pytest.approx(0.02)
    assert p.itl(3, 512) == pytest.approx(0.06)
    assert p.max_concurrency(0.1, 512) == pytest.approx(5.0, rel=1e-6)


def test_max_concurrency_and_decode_capacity_by_hand() -> None:
    p = profile()
    # context 512: itl = 0.03 + 0.005 * (c - 4) on [4, 8], so 0.04 s at c = 6
    assert p.max_concurrency(0.040, 512) == pytest.approx(6.0, rel=1e-6)
    assert p.itl(p.max_concurrency(0.040, 512), 512) <= 0.040
    assert p.decode_capacity(0.040, 512) == pytest.approx(6.0 / 0.040, rel=1e-6)
    # context 2048: itl = 0.045 + 0.00875 * (c - 4) on [4, 8], so 0.0625 s at c = 6
    assert p.max_concurrency(0.0625, 2048) == pytest.approx(6.0, rel=1e-6)
    # context 1280 (midway): itl(c) = (0.03 + 0.045) / 2 + ... = 0.0375 at c = 4
    assert p.max_concurrency(0.0375, 1280) == pytest.approx(4.0, rel=1e-6)
    # beyond the table: 0.05 + 0.005 * (c - 8) = 0.09 at c = 16
    assert p.max_concurrency(0.090, 512) == pytest.approx(16.0, rel=1e-6)


def test_a_target_exactly_at_the_single_request_itl_allows_one_request() -> None:
    assert profile().max_concurrency(0.020, 512) == pytest.approx(1.0, abs=1e-6)


def test_zero_capacity_when_the_target_is_below_the_single_request_itl() -> None:
    p = profile()
    assert p.max_concurrency(0.015, 512) == 0.0
    assert p.decode_capacity(0.015, 512) == 0.0
    assert p.max_concurrency(0.025, 2048) == 0.0  # 0.03 s alone at this context


def test_more_context_or_a_tighter_target_never_allows_more_requests() -> None:
    p = profile()
    assert p.max_concurrency(0.05, 512) > p.max_concurrency(0.05, 1024) > p.max_concurrency(0.05, 2048)
    assert p.max_concurrency(0.03, 512) < p.max_concurrency(0.04, 512) < p.max_concurrency(0.05, 512)


# ---- files --------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path: Path) -> None:
    original = profile(model="SmolLM2-135M", device="cpu")
    path = tmp_path / "profile.json"
    original.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == VERSION and data["meta"] == {"model": "SmolLM2-135M", "device": "cpu"}
    assert data["prefill"][0] == {"input_tokens": 100, "ttft_s": 0.10}
    assert data["decode"][0] == {"concurrency": 1, "context": 512, "itl_s": 0.020}
    loaded = Profile.load(str(path))
    assert loaded == original
    assert loaded.itl(6, 512) == original.itl(6, 512)


def test_from_json_without_meta() -> None:
    data = profile().to_json()
    del data["meta"]
    assert Profile.from_json(data).meta == {}


def _data(**overrides) -> dict:
    data = profile().to_json()
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_data(prefill=[{"input_tokens": 128, "ttft_s": 0.1}]), "prefill needs at least two input lengths"),
        (_data(prefill=[{"input_tokens": 128, "ttft_s": 0.1}, {"input_tokens": 128, "ttft_s": 0.2}]),
         "prefill needs at least two input lengths"),
        (_data(decode=[]), "decode needs at least one point"),
        (_data(version=2), "version 2 is not 1"),
        ({k: v for k, v in _data().items() if k != "version"}, "version None is not 1"),
        (_data(prefill=[{"input_tokens": 128}, {"input_tokens": 256, "ttft_s": 0.2}]), "malformed point"),
        (_data(decode=[{"concurrency": "four", "context": 512, "itl_s": 0.02}]), "malformed point"),
        (_data(decode=None), "malformed point"),
        ({k: v for k, v in _data().items() if k != "decode"}, "malformed point"),
        (_data(prefill=[{"input_tokens": 0, "ttft_s": 0.1}, {"input_tokens": 256, "ttft_s": 0.2}]), "bad prefill point"),
        (_data(prefill=[{"input_tokens": 128, "ttft_s": -1}, {"input_tokens": 256, "ttft_s": 0.2}]), "bad prefill point"),
        (_data(decode=[{"concurrency": 1, "context": 512, "itl_s": float("nan")}]), "bad decode point"),
        (_data(decode=[{"concurrency": 0, "context": 512, "itl_s": 0.02}]), "bad decode point"),
    ],
)
def test_invalid_profile_is_a_config_error_saying_what_is_wrong(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^profile: {message}"):
        Profile.from_json(data)


def test_load_of_a_missing_or_unparsable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile: cannot read .*nothing.json"):
        Profile.load(tmp_path / "nothing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="profile: cannot read .*broken.json"):
        Profile.load(broken)


def test_load_of_a_json_file_that_is_not_an_object_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="^profile: "):
        Profile.load(path)
