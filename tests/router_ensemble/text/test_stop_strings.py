from __future__ import annotations

import pytest

from router_ensemble.text.stop_strings import StopStringMatcher


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


@pytest.mark.parametrize(
    "pieces,stops,expected,hit",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["Hello", " wor", "ld"], [], "Hello world", False),
        (["a", "b", "c"], ["bd"], "abc", False),  # a held-back "b" is released
        (["x\n", "\nrest"], ["\n\n"], "x", True),  # stop string across deltas
        (["one two three"], ["three", "two"], "one ", True),  # the earliest one wins
        (["ab", "ab", "c"], ["abc"], "ab", True),
        (["end"], ["end"], "", True),
        (["café", " crème"], [" cr"], "café", True),
    ],
)
def test_stop_strings(pieces: list[str], stops: list[str], expected: str, hit: bool) -> None:
    assert feed_all(StopStringMatcher(stops), pieces) == (expected, hit)


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("RM") == ("STORM", False)
    assert matcher.flush() == ""
