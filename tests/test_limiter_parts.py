"""The limiter's parts, one at a time, on plain numbers and times: every transition of each.

(``tests/test_limiter.py`` drives the whole ``AdaptiveLimiter`` on a fake clock;
``tests/test_ratelimit.py`` runs it through ``Caller`` in virtual-time simulations.)
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from rekbatch.calls.limiter import LimiterSettings, Permit
from rekbatch.calls.limiter.background import BackgroundDetector, Trial, agree
from rekbatch.calls.limiter.pacer import Pacer
from rekbatch.calls.limiter.probing import Prober
from rekbatch.calls.limiter.quota import CutWindow, RefusalMeter, overflowed
from rekbatch.calls.limiter.recovery import GoodRate
from rekbatch.calls.limiter.service_bucket import ServiceBucketModel
from rekbatch.calls.limiter.traffic import Counts, Traffic

S = LimiterSettings()
NO_BACKGROUND = BackgroundDetector(S, now=0.0).within


def answer(permit: Permit, outcome: str) -> Permit:
    permit.outcome = outcome  # type: ignore[assignment]
    permit.refused = outcome == "throttle"
    return permit


def test_settings_are_frozen_and_named() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        S.margin = 0.1  # type: ignore[misc]
    assert LimiterSettings(margin=0.05).margin == 0.05
    assert {f.name for f in dataclasses.fields(S)} >= {"margin", "blind_cut", "hold"}


# --------------------------------------------------------------------------- pacer


def test_pacer_spends_its_small_burst_then_spaces_grants() -> None:
    pacer = Pacer(100.0, S, now=0.0)  # 5 banked: 0.05 s of 100/s
    for _ in range(5):
        assert pacer.ready_in(0.0, latency=0.1) == 0.0
        pacer.take(0.0)
    assert pacer.ready_in(0.0, latency=0.1) == pytest.approx(0.01)
    assert pacer.ready_in(0.01, latency=0.1) == 0.0
    assert pacer.in_flight == 5


def test_pacer_banks_at_least_one_grant_and_no_more_than_its_burst() -> None:
    slow = Pacer(2.0, S, now=0.0)
    assert slow.tokens(0.0) == 1.0  # 0.05 s of 2/s is a tenth: one grant all the same
    slow.take(0.0)
    assert slow.tokens(100.0) == 1.0  # idle for long: still one
    fast = Pacer(100.0, S, now=0.0)
    assert fast.tokens(100.0) == pytest.approx(5.0)


def test_pacer_new_rate_keeps_the_bank_a_fresh_one_clips_it_to_one_grant() -> None:
    pacer = Pacer(100.0, S, now=0.0)
    pacer.set_rate(200.0, 0.0)
    assert pacer.rate == 200.0 and pacer.tokens(0.0) == pytest.approx(5.0)
    pacer.set_rate(200.0, 0.0, fresh=True)
    assert pacer.tokens(0.0) == 1.0
    pacer.set_rate(20.0, 1.0)  # a lower rate: the bank shrinks to its burst
    assert pacer.tokens(1.0) == 1.0


def test_pacer_bounds_the_requests_in_flight_by_littles_law() -> None:
    pacer = Pacer(10.0, S, now=0.0)
    assert pacer.max_in_flight(latency=1.0) == 20  # 10/s x 1 s x 2
    assert pacer.max_in_flight(latency=0.01) == S.min_concurrency
    for i in range(4):
        pacer.take(i * 1.0)
    assert pacer.ready_in(10.0, latency=0.01) == math.inf  # 4 in flight: full
    pacer.release()
    assert pacer.ready_in(10.0, latency=0.01) == 0.0


# --------------------------------------------------------------------------- traffic


def test_traffic_reads_shares_from_settled_bins_only() -> None:
    traffic = Traffic(S)
    sent = [Permit(0.01 * i, 0, 100.0) for i in range(30)]  # 0.00 .. 0.29: three bins
    for permit in sent:
        traffic.on_send(permit)
    for permit in sent[:20]:
        traffic.on_answer(answer(permit, "ok"), 0.5)
    refused = answer(sent[25], "throttle")  # refusals come back first
    traffic.on_answer(refused, 0.3)
    settled = traffic.window(0.0, 0.3)
    assert (settled.sent, settled.answered, settled.refused) == (20, 20, 0)
    assert settled.seconds == pytest.approx(0.2)
    everything = traffic.window(0.0, 0.3, settled=False)
    assert (everything.sent, everything.answered, everything.refused) == (30, 21, 1)
    for permit in sent[20:25] + sent[26:]:
        traffic.on_answer(answer(permit, "ok"), 0.6)
    assert traffic.window(0.0, 0.3).share == pytest.approx(1 / 30)


def test_traffic_latest_skips_the_bin_still_filling_and_unsettled_bins() -> None:
    traffic = Traffic(S)
    permits = [Permit(0.05 * i, 0, 20.0) for i in range(20)]  # two a bin, 0 to 1 s
    for permit in permits:
        traffic.on_send(permit)
        traffic.on_answer(answer(permit, "ok"), permit.sent_at + 0.01)
    late = Permit(0.42, 0, 20.0)  # an unanswered one in the bin from 0.4 s
    traffic.on_send(late)
    recent = traffic.latest(now=0.95, seconds=0.3)  # 0.9-1.0 is filling: 0.6-0.9, then 0.5
    assert recent.seconds == pytest.approx(0.3)
    assert recent.answered == recent.ok == 6
    recent = traffic.latest(now=0.95, seconds=0.6)  # 0.4 unsettled: 0.8 down to 0.3
    assert recent.seconds == pytest.approx(0.6)
    assert recent.ok == 12 and recent.ok_rate == pytest.approx(20.0)


def test_traffic_latency_is_the_average_round_trip_of_accepted_requests() -> None:
    traffic = Traffic(S)
    assert traffic.latency == S.initial_latency
    first, second, refused = Permit(0.0, 0, 1.0), Permit(1.0, 0, 1.0), Permit(2.0, 0, 1.0)
    for permit in (first, second, refused):
        traffic.on_send(permit)
    traffic.on_answer(answer(first, "ok"), 0.2)
    assert traffic.latency == pytest.approx(0.2)  # the first answer replaces the guess
    traffic.on_answer(answer(second, "ok"), 1.4)
    assert traffic.latency == pytest.approx(0.2 + S.latency_weight * 0.2)
    traffic.on_answer(answer(refused, "throttle"), 2.001)
    assert traffic.latency == pytest.approx(0.22)  # refusals say nothing of the round trip


def test_traffic_sent_rate_span_and_recent_requests() -> None:
    traffic = Traffic(S)
    for i in range(100):  # 100/s for 1 s, then 50/s for 1 s
        traffic.on_send(Permit(0.01 * i, 0, 100.0))
    for i in range(50):
        traffic.on_send(Permit(1.0 + 0.02 * i, 0, 50.0))
    assert traffic.sent_rate(now=2.0, seconds=1.0) == pytest.approx(50.0)
    assert traffic.sent_rate(now=1.0, seconds=1.0) == pytest.approx(100.0)
    assert traffic.span_at(end=2.0, rate=50.0, longest=2.0) == pytest.approx(2.0)
    assert traffic.span_at(end=2.0, rate=100.0, longest=2.0) == pytest.approx(0.0)
    assert traffic.span_at(end=1.0, rate=100.0, longest=2.0) == pytest.approx(1.0)
    after = traffic.permits_after(1.9)
    assert [round(p.sent_at, 2) for p in after] == [1.92, 1.94, 1.96, 1.98]
    assert len(list(traffic.permits_between(0.5, 1.0))) == 50


def test_traffic_keeps_recent_requests_and_bins_within_their_horizons() -> None:
    traffic = Traffic(S)
    first = Permit(0.0, 0, 10.0)
    traffic.on_send(first)
    traffic.on_answer(answer(first, "ok"), 0.1)  # a round trip of 0.1 s: 20 of them is 2 s
    for i in range(1, 300):
        traffic.on_send(Permit(0.1 * i, 0, 10.0))  # 30 s
    assert traffic.permits_after(0.0)[0].sent_at == pytest.approx(29.9 - S.recent_seconds)
    assert traffic.window(0.0, 30.0, settled=False).seconds == pytest.approx(S.bin_horizon)


# --------------------------------------------------------------------------- the service's bucket


def test_bucket_model_books_nothing_without_a_quota() -> None:
    model = ServiceBucketModel(S, now=0.0)
    assert model.book(1.0) is None and model.tokens(1.0) == 0.0


def test_bucket_model_refills_at_the_quota_up_to_its_depth_and_books_requests() -> None:
    model = ServiceBucketModel(S, now=0.0)
    model.set_quota(10.0, 0.0)
    assert model.tokens(0.5) == pytest.approx(5.0)
    assert model.tokens(5.0) == pytest.approx(10.0)  # one second of quota at most
    assert model.book(5.0) == pytest.approx(10.0)
    assert model.tokens(5.0) == pytest.approx(9.0)
    model.set_quota(20.0, 5.0)  # refilled at 10/s up to now, at 20/s from now on
    assert model.tokens(5.1) == pytest.approx(11.0)


def test_bucket_model_hands_back_tokens_of_requests_booked_after_its_basis() -> None:
    model = ServiceBucketModel(S, now=0.0)
    model.set_quota(10.0, 0.0)
    model.empty(1.0)
    before = Permit(0.5, 0, 10.0, booked=True)
    after = Permit(1.5, 0, 10.0, booked=True)
    unbooked = Permit(1.5, 0, 10.0)
    for permit in (before, after, unbooked):
        model.hand_back(permit)
    assert model.tokens(1.0) == pytest.approx(1.0)  # only ``after`` counted


def test_bucket_model_resyncs_at_a_refusal() -> None:
    model = ServiceBucketModel(S, now=0.0)
    model.set_quota(10.0, 0.0)
    assert not model.synced
    # Refused at 2.0 (empty then); since then 0.5 s of refill and 3 requests spent.
    model.resync(2.0, spent=3, now=2.5, newer=True)
    assert model.synced and model.basis == 2.0
    assert model.tokens(2.5) == pytest.approx(S.resync_level + 5.0 - 3.0)
    # An older refusal only bounds it from above.
    model.resync(1.9, spent=7, now=2.5, newer=False)
    assert model.tokens(2.5) == pytest.approx(1.0 + 6.0 - 7.0)
    model.resync(1.8, spent=0, now=2.5, newer=False)
    assert model.tokens(2.5) == pytest.approx(0.0)  # a looser bound changes nothing


# --------------------------------------------------------------------------- quota measures


def test_overflowed_tells_a_measure_from_a_lower_bound() -> None:
    tight = [answer(Permit(0.1 * i, 0, 10.0), "ok") for i in range(1, 30)]  # 10/s for 3 s
    assert not overflowed(0.0, 3.0, tight, quota=10.0, capacity=10.0, settings=S)
    sparse = [answer(Permit(0.1, 0, 10.0), "ok")]  # one request in 3 s at 10/s
    assert overflowed(0.0, 3.0, sparse, quota=10.0, capacity=10.0, settings=S)
    idle_at_the_end = tight[:15]  # 1.5 s of requests, then 1.5 s of none
    assert overflowed(0.0, 3.0, idle_at_the_end, quota=10.0, capacity=10.0, settings=S)


def test_refusal_meter_measures_between_refusals_seconds_apart() -> None:
    meter = RefusalMeter(S)
    assert meter.on_refusal(1.0, []) and meter.anchor == 1.0  # the first one anchors
    sent = [Permit(1.0 + 0.1 * i, 0, 10.0) for i in range(1, 30)]
    for permit in sent:
        meter.on_send(permit)
    assert not meter.on_refusal(0.5, [])  # older than the anchor: nothing
    assert meter.on_refusal(4.0, [])  # 3 s later: a measure, waiting for its answers
    assert meter.anchor == 4.0
    for permit in sent[:-1]:
        answer(permit, "ok")
        meter.on_answer(permit)
    assert meter.measured() is None
    meter.on_answer(answer(sent[-1], "ok"))
    measured = meter.measured()
    assert measured is not None
    start, end, window = measured
    assert (start, end, len(window)) == (1.0, 4.0, 29)
    assert meter.measured() is None  # taken once


def test_refusal_meter_moves_its_anchor_without_measuring_close_refusals() -> None:
    meter = RefusalMeter(S)
    meter.on_refusal(1.0, [])
    assert meter.on_refusal(1.5, [])
    assert meter.anchor == 1.5 and meter.measured() is None
    meter.clear()
    assert meter.anchor is None


def test_cut_window_waits_for_the_window_and_answers_after_the_cut() -> None:
    sent = [Permit(1.0 + 0.02 * i, 0, 50.0) for i in range(10)]  # 1.00 .. 1.18
    cut = CutWindow(start=1.0, end=1.2, from_rate=50.0, sent=sent)
    for permit in sent:
        assert not cut.ready(1.3, 0.1, S)
        cut.on_answer(answer(permit, "ok" if permit.sent_at < 1.1 else "throttle"))
    assert not cut.ready(1.3, 0.1, S)  # nothing sent after the cut has answered
    first = answer(Permit(1.25, 1, 25.0), "ok")
    cut.on_answer(first)
    assert not cut.ready(1.3, 0.1, S)
    assert cut.ready(1.2 + 4 * 0.1 + 0.01, 0.1, S)  # one, and four round trips
    cut.on_answer(answer(Permit(1.27, 1, 25.0), "ok"))
    assert cut.ready(1.3, 0.1, S)
    assert [round(p.sent_at, 2) for p in cut.refused()] == [1.1, 1.12, 1.14, 1.16, 1.18]


def test_cut_window_measures_between_first_and_last_refusal_leaning_low() -> None:
    sent = [Permit(1.0 + 0.02 * i, 0, 50.0) for i in range(51)]  # 1.00 .. 2.00 at 50/s
    cut = CutWindow(start=1.0, end=2.01, from_rate=50.0, sent=sent)
    for i, permit in enumerate(sent):  # every other refused: 25/s accepted
        cut.on_answer(answer(permit, "throttle" if i % 2 == 0 else "ok"))
    quota, error = cut.measure(10.0, 0.0, 0.1, NO_BACKGROUND, S)
    assert error == pytest.approx(25.0 * S.cut_error)
    assert quota == pytest.approx(25.0 - error / 2)
    # Capped by the rate refused, raised to a floor.
    assert cut.measure(10.0, 60.0, 0.1, NO_BACKGROUND, S)[0] == 50.0
    assert cut.measure(10.0, 30.0, 0.1, NO_BACKGROUND, S)[0] == 30.0


def test_cut_window_takes_the_blind_rate_unless_refused_after_the_echo() -> None:
    sent = [Permit(1.0 + 0.1 * i, 0, 10.0) for i in range(3)]  # refused once, then ok
    cut = CutWindow(start=1.0, end=1.25, from_rate=10.0, sent=sent)
    cut.on_answer(answer(sent[0], "throttle"))
    for permit in sent[1:]:
        cut.on_answer(answer(permit, "ok"))
    echo = answer(Permit(1.3, 1, 5.0), "throttle")  # within the echo of the cut
    cut.on_answer(echo)
    quota, _ = cut.measure(5.0, 0.0, 0.1, NO_BACKGROUND, S)
    assert quota >= 5.0
    cut.on_answer(answer(Permit(1.5, 1, 5.0), "throttle"))  # after it: the blind rate is no floor
    quota, _ = cut.measure(5.0, 0.0, 0.1, NO_BACKGROUND, S)
    assert quota < 5.0


def test_cut_window_extends_on_a_second_cut() -> None:
    sent = [Permit(1.0 + 0.1 * i, 0, 10.0) for i in range(6)]
    cut = CutWindow(start=1.0, end=1.25, from_rate=10.0, sent=sent)
    for permit in sent[:3]:
        cut.on_answer(answer(permit, "ok"))
    cut.on_answer(answer(sent[3], "ok"))  # after the cut
    cut.extend(1.55, sent)
    assert cut.end == 1.55 and not cut.ready(5.0, 0.1, S)  # 1.4 and 1.5 out now
    for permit in sent[4:]:
        cut.on_answer(answer(permit, "ok"))
    cut.on_answer(answer(Permit(1.6, 2, 5.0), "ok"))
    cut.on_answer(answer(Permit(1.7, 2, 5.0), "ok"))
    assert cut.ready(1.8, 0.1, S)


# --------------------------------------------------------------------------- probing


def test_prober_holds_longer_while_probes_fail_and_shorter_while_recovering() -> None:
    prober = Prober(S)
    assert prober.hold_time(quota=10.0, good=None, calibrated=True) == S.hold
    prober.failed(lengthen=True)
    assert prober.hold_time(10.0, None, True) == 2 * S.hold
    for _ in range(5):
        prober.failed(lengthen=True)
    assert prober.hold_time(10.0, None, True) == S.max_hold
    prober.failed(lengthen=False)
    assert prober.slow_hold == S.max_hold
    assert prober.hold_time(10.0, good=20.0, calibrated=True) == S.recover_hold
    assert prober.hold_time(10.0, None, calibrated=False) == S.rough_hold
    prober.succeeded()
    assert prober.slow_hold == S.hold and prober.passed == 1
    prober.failed(lengthen=True)
    prober.shorten()
    assert prober.slow_hold == S.hold


def test_prober_spends_the_bank_fast_then_crawls() -> None:
    prober = Prober(S)
    prober.start(0.0)
    assert prober.probes == 1
    fast = prober.rate(0.0, quota=50.0, banked=10.0, good=None, calibrated=True, ceiling=200.0)
    assert fast == pytest.approx(75.0)
    crawl = prober.rate(0.0, quota=50.0, banked=0.5, good=None, calibrated=True, ceiling=200.0)
    assert crawl == pytest.approx(55.0)
    low = prober.rate(0.0, quota=5.0, banked=0.5, good=None, calibrated=True, ceiling=200.0)
    assert low == pytest.approx(5.0 + S.min_crawl)
    back = prober.rate(0.0, quota=50.0, banked=0.5, good=100.0, calibrated=True, ceiling=200.0)
    assert back == pytest.approx(50.0 + 50.0 * S.recover_crawl)


def test_measuring_probe_doubles_its_crawl_and_passes_when_held_at_its_limit() -> None:
    prober = Prober(S)
    prober.start(0.0)
    args = {"quota": 50.0, "banked": 0.0, "good": None, "calibrated": False, "ceiling": 100.0}
    assert not prober.advance(0.0, **args)  # the crawl starts now
    assert prober.rate(0.0, **args) == pytest.approx(55.0)
    assert prober.rate(0.5, **args) == pytest.approx(60.0)
    assert prober.rate(1.0, **args) == pytest.approx(70.0)
    assert prober.rate(5.0, **args) == 100.0  # at the limit (the ceiling)
    assert not prober.advance(5.0, **args)  # reached it now
    assert not prober.advance(5.5, **args)
    assert prober.advance(5.0 + S.server_burst, **args)
    # Below an earlier good rate, it stops just under it.
    assert prober.limit(quota=50.0, good=80.0, ceiling=100.0) == pytest.approx(80.0 * 0.97)


def test_prober_depth_past_the_empty_point() -> None:
    prober = Prober(S)
    cap = 50.0
    assert prober.depth(0.0, cap, calibrated=False, synced=True, anchor=0.0, error=1.0) == (
        math.inf
    )
    assert prober.depth(0.0, cap, True, synced=False, anchor=0.0, error=1.0) == 2.0 + cap
    assert prober.depth(3.0, cap, True, synced=True, anchor=0.0, error=0.5) == 2.0 + 1.5
    assert prober.depth(300.0, cap, True, synced=True, anchor=0.0, error=0.5) == 2.0 + cap


def test_prober_passes_once_all_its_sends_answered_none_refused_for_the_rate() -> None:
    prober = Prober(S)
    prober.start(0.0)
    first, second, third = Permit(1.0, 0, 1.0), Permit(1.1, 0, 1.0), Permit(1.2, 0, 1.0)
    for permit in (first, second, third):
        prober.sent(permit)
    assert not prober.passed_with(answer(first, "ok"))
    assert not prober.passed_with(answer(second, "error"))  # a failure: neither way
    assert prober.passed_with(answer(third, "ok"))
    assert not prober.passed_with(answer(Permit(1.3, 0, 1.0), "ok"))  # not one of its own
    prober.start(2.0)
    only_errors = Permit(2.1, 0, 1.0)
    prober.sent(only_errors)
    assert not prober.passed_with(answer(only_errors, "error"))  # nothing accepted
    prober.start(3.0)
    refused, accepted = Permit(3.1, 0, 1.0), Permit(3.2, 0, 1.0)
    prober.sent(refused)
    prober.sent(accepted)
    answer(refused, "throttle")
    assert not prober.passed_with(answer(accepted, "ok"))


# --------------------------------------------------------------------------- recovery


def test_good_rate_keeps_the_highest_and_forgets_it() -> None:
    good = GoodRate(S, now=0.0)
    good.remember(40.0, error=1.0, calibrated=True, now=0.0)
    good.remember(30.0, error=2.0, calibrated=False, now=1.0)
    assert (good.rate, good.error, good.calibrated) == (40.0, 1.0, True)
    assert good.recall(50.0, quota=20.0, steady_for=0.0) == 40.0
    assert good.recall(1.0 + S.memory + 1, quota=20.0, steady_for=0.0) is None  # too old
    good.remember(40.0, 1.0, True, now=200.0)
    assert good.recall(201.0, quota=40.0, steady_for=2 * S.recover_hold) is None  # reached
    good.remember(40.0, 1.0, True, now=300.0)
    good.forget_below(39.0)  # a quota about as high: nothing to come back to
    assert good.rate is None
    good.remember(40.0, 1.0, True, now=300.0)
    good.forget()
    assert good.rate is None


def test_good_rate_jump_holds_after_a_few_round_trips() -> None:
    good = GoodRate(S, now=0.0)
    good.jump(quota=20.0, now=10.0)
    assert good.fallback == 20.0
    assert not good.jump_held(10.0 + S.jump_seconds - 0.1, latency=0.1)
    assert good.jump_held(10.0 + S.jump_seconds + 0.1, latency=0.1) and good.fallback is None
    good.jump(20.0, now=20.0)
    slow = S.jump_seconds / S.jump_trips * 2  # four such round trips: twice jump_seconds
    assert not good.jump_held(20.0 + S.jump_seconds + 0.1, latency=slow)
    good.end_jump()
    assert good.fallback is None and not good.jump_held(30.0, latency=0.1)


# --------------------------------------------------------------------------- background


def feed(traffic: Traffic, start: float, seconds: float, rate: float, refused_every: int) -> None:
    """Requests at ``rate`` from ``start``, each answered within the same tenth; every
    ``refused_every``-th refused (0: none)."""
    count = round(seconds * rate)
    for i in range(count):
        permit = Permit(start + i / rate, 0, rate)
        traffic.on_send(permit)
        refused = refused_every > 0 and i % refused_every == refused_every - 1
        traffic.on_answer(answer(permit, "throttle" if refused else "ok"), permit.sent_at)


def test_agree_within_three_standard_errors() -> None:
    assert agree(10, 100, 0.1, 3.0)
    assert agree(18, 100, 0.1, 3.0)
    assert not agree(25, 100, 0.1, 3.0)
    assert agree(1, 100, 0.0, 3.0)  # one request of slack


def test_refusals_before_the_first_cut_wait_for_enough_answers() -> None:
    detector = BackgroundDetector(S, now=0.0)
    traffic = Traffic(S)
    feed(traffic, 0.0, 0.1, 100.0, refused_every=10)  # 10 answered, 1 refused
    assert not detector.counts_for_rate(traffic, 0.15, cut_before=False)
    assert detector.counts_for_rate(traffic, 0.15, cut_before=True)
    feed(traffic, 0.1, 0.2, 100.0, refused_every=10)
    assert detector.counts_for_rate(traffic, 0.35, cut_before=False)


def test_overwhelming_refusals_count_at_once() -> None:
    detector = BackgroundDetector(S, now=0.0)
    traffic = Traffic(S)
    for i in range(30):  # two in three refused, at once; the rest still out
        permit = Permit(0.003 * i, 0, 100.0)
        traffic.on_send(permit)
        if i % 3:
            traffic.on_answer(answer(permit, "throttle"), permit.sent_at + 0.002)
    assert detector.overwhelming(traffic, 0.09)  # nothing settled yet: all answers so far
    assert detector.counts_for_rate(traffic, 0.09, cut_before=False)


def test_a_heavy_share_among_few_answers_is_not_overwhelming() -> None:
    # A background refusing a fifth: 7 of the first 20 by chance, answered first.
    detector = BackgroundDetector(S, now=0.0)
    traffic = Traffic(S)
    for i in range(20):
        permit = Permit(0.0, 0, 400.0)
        traffic.on_send(permit)
        if i < 7:
            traffic.on_answer(answer(permit, "throttle"), 0.002)
    assert not detector.overwhelming(traffic, 0.002)
    assert not detector.counts_for_rate(traffic, 0.002, cut_before=False)


def learned(share: float, answers: int) -> BackgroundDetector:
    """A detector that learned ``share`` from a trial with ``answers`` answers."""
    detector = BackgroundDetector(S, now=0.0)
    traffic = Traffic(S)
    every = round(1 / share)
    feed(traffic, 0.0, 2.0, answers / 4, every)
    detector.open_trial(traffic, 2.0, before=answers / 4, level_rate=answers / 8)
    feed(traffic, 2.0, 6.0, answers / 8, every)
    assert detector.judge(traffic, 8.05).kind == "background"
    return detector


def test_a_background_learned_from_few_answers_needs_more_to_be_passed() -> None:
    traffic = Traffic(S)
    feed(traffic, 10.0, 2.0, 100.0, refused_every=4)  # a quarter refused: 200 answers
    sure = learned(0.1, answers=2000)
    unsure = learned(0.1, answers=80)
    assert sure.counts_for_rate(traffic, 12.05, cut_before=True)
    assert not unsure.counts_for_rate(traffic, 12.05, cut_before=True)


def test_refusals_within_the_background_do_not_count() -> None:
    detector = learned(0.1, answers=2000)
    traffic = Traffic(S)
    feed(traffic, 0.0, 2.0, 100.0, refused_every=10)
    assert not detector.counts_for_rate(traffic, 2.05, cut_before=True)
    feed(traffic, 2.0, 2.0, 100.0, refused_every=3)
    assert detector.counts_for_rate(traffic, 4.05, cut_before=True)
    detector.trial = Trial(start=4.0, before=100.0, level_rate=50.0, level_start=4.0)
    assert not detector.counts_for_rate(traffic, 4.05, cut_before=True)  # a trial decides


def test_no_trial_when_the_refusals_before_the_cut_were_plainly_the_quotas() -> None:
    detector = BackgroundDetector(S, now=0.0)
    clean = Traffic(S)
    feed(clean, 0.0, 2.0, 100.0, refused_every=0)
    detector.open_trial(clean, 2.05, before=100.0, level_rate=50.0)
    assert detector.trial is None
    overwhelmed = Traffic(S)
    feed(overwhelmed, 0.0, 2.0, 100.0, refused_every=2)
    detector.open_trial(overwhelmed, 2.05, before=100.0, level_rate=50.0)
    assert detector.trial is None
    background = Traffic(S)
    feed(background, 0.0, 2.0, 100.0, refused_every=10)
    detector.open_trial(background, 2.05, before=100.0, level_rate=50.0)
    assert detector.trial == Trial(
        start=2.05, before=100.0, level_rate=50.0, level_start=2.05, opened_at_share=0.1
    )


def test_a_trial_opens_when_too_few_answered_before_the_refused_request() -> None:
    # Ten answers before the refused request went (a client held up by its own processor),
    # then a clean second: what came before it cannot say the refusals are new.
    detector = BackgroundDetector(S, now=0.0)
    traffic = Traffic(S)
    feed(traffic, 0.0, 1.0, 10.0, refused_every=0)
    feed(traffic, 1.0, 1.0, 30.0, refused_every=0)
    detector.open_trial(traffic, 2.05, before=30.0, level_rate=15.0, refused_at=1.0)
    assert detector.trial is not None


def trial_after(
    rate: float, refused_every: int, level_rate: float, level_refused_every: int, seconds: float
) -> tuple[BackgroundDetector, Traffic]:
    """Two seconds at ``rate``, a cut to ``level_rate`` at 2.0, ``seconds`` there."""
    detector = BackgroundDetector(S, now=0.0)
    traffic = Traffic(S)
    feed(traffic, 0.0, 2.0, rate, refused_every)
    detector.open_trial(traffic, 2.0, before=rate, level_rate=level_rate)
    assert detector.trial is not None
    feed(traffic, 2.0, seconds, level_rate, level_refused_every)
    return detector, traffic


def test_trial_waits_for_enough_answers_then_judges_anyway() -> None:
    detector, traffic = trial_after(100.0, 10, 50.0, 10, seconds=0.5)
    assert detector.judge(traffic, 2.55).kind == "wait"  # 25 answers: 2 refusals expected
    assert detector.judge(traffic, 2.0 + S.trial_longest + 0.1).kind != "wait"


def test_trial_with_too_few_answers_by_its_longest_undoes_the_cut_and_learns_nothing() -> None:
    detector, traffic = trial_after(100.0, 10, 50.0, 10, seconds=0.0)
    feed(traffic, 2.0, S.trial_longest, 1.0, refused_every=0)  # held up: 1 a second
    verdict = detector.judge(traffic, 2.0 + S.trial_longest + 0.1)
    assert verdict.kind == "background" and verdict.rate == 100.0
    assert detector.trial is None and detector.share == 0.0


def test_trial_releases_when_the_refusals_stop() -> None:
    detector, traffic = trial_after(100.0, 10, 50.0, 0, seconds=3.0)
    assert detector.judge(traffic, 5.05).kind == "release"
    assert detector.trial is None and detector.share == 0.0


def test_trial_learns_a_light_share_refused_at_the_lower_rate_too() -> None:
    detector, traffic = trial_after(100.0, 10, 50.0, 10, seconds=3.0)
    verdict = detector.judge(traffic, 5.05)
    assert verdict.kind == "background" and verdict.rate == 100.0
    assert detector.share == pytest.approx(0.1, abs=0.01) and detector.trial is None


def test_trial_halves_again_from_the_rate_actually_sent() -> None:
    # Refused a fifth at 100/s and a fifth at "50/s", which the client only sent at 40/s.
    detector, _ = trial_after(100.0, 5, 50.0, 5, seconds=3.0)
    traffic_at_40 = Traffic(S)
    feed(traffic_at_40, 0.0, 2.0, 100.0, 5)
    feed(traffic_at_40, 2.0, 3.0, 40.0, 5)
    verdict = detector.judge(traffic_at_40, 5.05)
    assert verdict.kind == "next_level"
    trial = detector.trial
    assert trial is not None and trial.level == 2
    assert trial.level_rate == pytest.approx(20.0) and trial.level_start == 5.05


def level_two() -> BackgroundDetector:
    """A trial at level 2 from 3.0, after level 1 accepted 40/s with a fifth refused."""
    detector = BackgroundDetector(S, now=0.0)
    detector.trial = Trial(
        start=0.0,
        before=100.0,
        level_rate=25.0,
        level_start=3.0,
        level=2,
        first_level=Counts(sent=150, answered=150, refused=30, ok=120, seconds=3.0),
    )
    return detector


def test_level_two_tells_the_background_from_a_quota_below_both_levels() -> None:
    traffic = Traffic(S)
    feed(traffic, 3.0, 3.0, 25.0, refused_every=5)  # 20/s accepted: followed the rate
    detector = level_two()
    assert detector.judge(traffic, 6.05).kind == "background"
    assert detector.share == pytest.approx(0.2, abs=0.02)

    traffic = Traffic(S)
    feed(traffic, 3.0, 3.0, 50.0, refused_every=5)  # 40/s accepted: as many as before
    detector = level_two()
    verdict = detector.judge(traffic, 6.05)
    assert verdict.kind == "quota" and verdict.rate == pytest.approx(40.0)

    traffic = Traffic(S)
    feed(traffic, 3.0, 3.0, 25.0, refused_every=0)  # refused at level 1 only
    detector = level_two()
    verdict = detector.judge(traffic, 6.05)
    assert verdict.kind == "quota" and verdict.rate == pytest.approx(40.0)


def test_level_two_waits_longer_before_it_calls_the_refusals_stopped() -> None:
    # Level 1 refused 9 of 42 (a 10% background, unluckily heavy); none of the first 28 at
    # level 2 is what a 10% background gives one time in twenty: not yet a quota.
    detector = BackgroundDetector(S, now=0.0)
    detector.trial = Trial(
        start=0.0,
        before=400.0,
        level_rate=10.0,
        level_start=3.0,
        level=2,
        first_level=Counts(sent=42, answered=42, refused=9, ok=24, seconds=2.1),
    )
    traffic = Traffic(S)
    feed(traffic, 3.0, 2.8, 10.0, refused_every=0)
    assert detector.judge(traffic, 5.85).kind == "wait"
    feed(traffic, 5.8, 3.2, 10.0, refused_every=0)  # 60 answers, none refused
    verdict = detector.judge(traffic, 9.05)
    assert verdict.kind == "quota" and verdict.rate == pytest.approx(24 / 2.1)


def test_with_a_background_known_a_rise_above_it_is_judged_at_the_cut() -> None:
    # The share at the cut's rate agrees with the share before: a heavier background.
    detector, traffic = trial_after(100.0, 4, 50.0, 4, seconds=3.0)
    detector.share = 0.1
    verdict = detector.judge(traffic, 5.05)
    assert verdict.kind == "background" and detector.share == pytest.approx(0.25, abs=0.02)
    # Down to the background at the cut's rate: the quota's were on top.
    detector, traffic = trial_after(100.0, 3, 50.0, 10, seconds=3.0)
    detector.share = 0.1
    assert detector.judge(traffic, 5.05).kind == "release"
    assert detector.share == 0.1
    # In between (a quota at about the cut's rate, say): the accepted rate at a lower
    # level will tell.
    detector, traffic = trial_after(100.0, 3, 50.0, 5, seconds=4.0)
    detector.share = 0.1
    assert detector.judge(traffic, 6.05).kind == "next_level"


def test_with_a_background_known_level_two_counts_only_refusals_above_it() -> None:
    # Level 1 accepted 40/s with a fifth refused; at level 2 a tenth, the background.
    detector = level_two()
    detector.share = 0.1
    traffic = Traffic(S)
    feed(traffic, 3.0, 5.0, 25.0, refused_every=10)
    verdict = detector.judge(traffic, 8.05)
    assert verdict.kind == "quota" and verdict.rate == pytest.approx(40.0)  # level 1's


def test_background_is_followed_down_and_forgotten() -> None:
    detector = BackgroundDetector(S, now=0.0)
    detector.share = 0.1
    traffic = Traffic(S)
    feed(traffic, 0.0, 2.0, 100.0, refused_every=0)
    detector.track(traffic, 1.0)  # not yet: every background_window seconds
    assert detector.share == 0.1
    detector.track(traffic, 2.05)
    assert detector.share == pytest.approx(0.07)
    for t in range(4, 20, 2):
        feed(traffic, t - 2.0, 2.0, 100.0, refused_every=0)
        detector.track(traffic, t + 0.05)
    assert detector.share == 0.0  # 0.1 x 0.7^8 is under forget_share


def test_background_is_followed_up_within_it() -> None:
    detector = BackgroundDetector(S, now=0.0)
    detector.share = 0.1
    traffic = Traffic(S)
    feed(traffic, 0.0, 2.0, 100.0, refused_every=8)  # 0.125: within the background
    read = traffic.window(0.05, 2.05).share
    detector.track(traffic, 2.05)
    assert read == pytest.approx(0.125, abs=0.01)
    assert detector.share == pytest.approx(0.1 + S.track_weight * (read - 0.1))
