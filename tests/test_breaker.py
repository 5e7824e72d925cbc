"""The failure breaker on plain values: the share over a window, and the streak."""

from __future__ import annotations

import itertools

import pytest

from rekbatch.calls.breaker import STREAK, FailureBreaker


def feed(breaker: FailureBreaker, codes: list[str | None]) -> int | None:
    """Feed ``codes``; the index of the record that tripped the breaker, or None."""
    for i, code in enumerate(codes):
        if breaker.record(code) is not None:
            return i
    return None


def test_the_same_code_twenty_times_in_a_row_trips() -> None:
    breaker = FailureBreaker()
    assert feed(breaker, ["InvalidResponse"] * (STREAK - 1)) is None
    trip = breaker.record("InvalidResponse")
    assert trip is not None and trip.streak
    assert (trip.code, trip.failed) == ("InvalidResponse", STREAK)
    assert "InvalidResponse" in trip.reason() and str(STREAK) in trip.reason()
    assert breaker.record(None) is trip  # stays tripped


def test_a_success_or_another_code_between_failures_starts_the_streak_again() -> None:
    breaker = FailureBreaker()
    pattern = ["InvalidResponse"] * (STREAK - 1) + [None]
    assert feed(breaker, pattern * 5) is None
    mixed = list(itertools.islice(itertools.cycle(["InternalServerError", "Timeout"]), 100))
    assert feed(FailureBreaker(), mixed) is None


@pytest.mark.parametrize("code", ["InvalidImageFormatException", "NoSuchKey"])
def test_failures_about_the_object_itself_make_no_streak(code: str) -> None:
    breaker = FailureBreaker()
    assert feed(breaker, [code] * 200) is None


def test_more_than_the_share_of_a_full_window_trips() -> None:
    breaker = FailureBreaker(max_failed_share=0.5, window=100)
    # 51 failures in the last 100, never 20 in a row: trips at the first full window
    # holding more than half
    codes: list[str | None] = []
    for i in range(300):
        codes.append(None if i % 2 else "AccessDeniedException")
    assert feed(breaker, codes[:99]) is None  # the window is not full yet
    assert feed(breaker, codes[99:]) is None  # exactly half: not more than the share
    breaker = FailureBreaker(max_failed_share=0.5, window=100)
    lopsided = (["AccessDeniedException"] * 3 + [None] * 2) * 40  # 60% failed
    at = feed(breaker, lopsided)
    assert at == 99
    trip = breaker.tripped
    assert trip is not None and not trip.streak
    assert (trip.code, trip.failed, trip.seen) == ("AccessDeniedException", 60, 100)


def test_the_window_slides() -> None:
    breaker = FailureBreaker(max_failed_share=0.5, window=100)
    early_failures = ["InternalServerError"] * 10 + [None]  # 10 in a row, then ok
    assert feed(breaker, early_failures * 4 + [None] * 60) is None
    # the window now holds 100 records of which 40 failed; 20 more successes push the
    # oldest failures out
    assert breaker.failed == sum(1 for c in list(breaker._recent) if c is not None)
    assert feed(breaker, [None] * 30) is None
    assert breaker.failed < 40


def test_share_one_turns_the_share_rule_off_but_not_the_streak() -> None:
    breaker = FailureBreaker(max_failed_share=1.0, window=10)
    assert feed(breaker, (["A", "B"] * 5) * 10) is None
    assert feed(breaker, ["A"] * 10) == 9  # the streak is at most the window


@pytest.mark.parametrize(("share", "window"), [(0.0, 10), (1.5, 10), (0.5, 0)])
def test_settings_out_of_range_are_refused(share: float, window: int) -> None:
    with pytest.raises(ValueError):
        FailureBreaker(share, window)
