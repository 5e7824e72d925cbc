"""``AdaptiveLimiter`` on a fake clock: pacing, settling, and every transition between its
phases (ceiling, cut, hold, probe, verify), driven one request at a time.

``Service`` is a token bucket at a quota (1 s deep, starting full) on the fake clock that
answers every request after ``latency``; ``drive`` sends through the limiter for a while, one
request at a time, and settles each answer once the clock has passed it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from rekbatch.calls.limiter import AdaptiveLimiter, LimiterSettings, Permit
from tests.support.virtual_clock import FakeClock, VirtualClock


@dataclass
class Service:
    quota: float
    latency: float = 0.1
    background_every: int = 0
    """Refuse every n-th request whatever the rate (0: never)."""
    tokens: float = field(init=False)
    at: float = 0.0
    calls: int = 0

    def __post_init__(self) -> None:
        self.tokens = self.quota

    def take(self, now: float) -> bool:
        self.calls += 1
        if self.background_every and self.calls % self.background_every == 0:
            return False
        self.tokens = min(self.quota, self.tokens + (now - self.at) * self.quota)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class Drive:
    limiter: AdaptiveLimiter
    clock: FakeClock
    service: Service
    pending: list[tuple[float, int, Permit, bool]] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def settle_due(self) -> None:
        while self.pending and self.pending[0][0] <= self.clock.now():
            _, _, permit, ok = heapq.heappop(self.pending)
            if ok:
                self.limiter.on_success(permit)
            else:
                self.limiter.on_throttle(permit)
            self.note()

    def note(self) -> None:
        phase = self.limiter.phase
        if not self.phases or self.phases[-1][1] != phase:
            self.phases.append((self.clock.now(), phase))

    async def run(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Send for ``seconds``, then let the answers in; or stop as soon as ``until()``."""
        end = self.clock.now() + seconds
        while self.clock.now() < end:
            while self.pending and math.isinf(self.limiter.ready_in()):
                # As many in flight as the limiter allows: the next answer frees one.
                self.clock.advance(self.pending[0][0] - self.clock.now())
                self.settle_due()
            permit = await self.limiter.acquire()
            self.note()
            ok = self.service.take(self.clock.now())
            answer_at = self.clock.now() + self.service.latency
            heapq.heappush(self.pending, (answer_at, next(self._order), permit, ok))
            self.settle_due()
            if until is not None and until():
                return
        self.clock.advance(2 * self.service.latency)
        self.settle_due()

    def seen(self, *phases: str) -> bool:
        """Were these phases entered in this order (others between allowed)?"""
        names = iter(name for _, name in self.phases)
        return all(phase in names for phase in phases)


def drive(ceiling: float, quota: float, **settings: float) -> Drive:
    clock = FakeClock()
    limiter = AdaptiveLimiter(ceiling, clock=clock, settings=LimiterSettings(**settings))
    return Drive(limiter, clock, Service(quota))


# --------------------------------------------------------------------------- pacing


async def test_starts_at_the_ceiling_and_spaces_permits() -> None:
    clock = FakeClock(100.0)
    limiter = AdaptiveLimiter(10.0, clock=clock, name="DetectFaces")
    assert limiter.rate == limiter.ceiling == 10.0 and limiter.phase == "ceiling"
    sent = []
    for _ in range(20):
        permit = await limiter.acquire()
        sent.append(permit.sent_at)
        limiter.on_success(permit)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps == pytest.approx([0.1] * 19)
    snap = limiter.snapshot()
    assert snap["name"] == "DetectFaces" and snap["phase"] == "ceiling"
    assert snap["rate"] == 10.0 and snap["ceiling"] == 10.0
    assert snap["successes"] == 20 and snap["throttles"] == 0 and snap["cuts"] == 0
    assert snap["in_flight"] == 0


def test_waiters_are_served_first_come_first_served_and_never_above_the_ceiling() -> None:
    clock = VirtualClock()
    limiter = AdaptiveLimiter(20.0, clock=clock)
    order: list[int] = []
    times: list[float] = []

    async def one(i: int) -> None:
        await clock.sleep(i * 1e-6)  # queue up in order
        permit = await limiter.acquire()
        order.append(i)
        times.append(clock.now())
        await clock.sleep(0.05)
        limiter.on_success(permit)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(200)))

    clock.run(main())
    assert order == list(range(200))
    burst = max(1.0, 20.0 * limiter.settings.burst)
    for start in times:
        assert sum(1 for t in times if start <= t < start + 1.0) <= 20.0 + burst
    assert times[-1] == pytest.approx(199 / 20.0, abs=0.1)


def test_in_flight_follows_littles_law_not_the_pool_size() -> None:
    clock = VirtualClock()
    limiter = AdaptiveLimiter(20.0, clock=clock)
    peak = 0

    async def consumer() -> None:
        nonlocal peak
        while clock.now() < 20.0:
            permit = await limiter.acquire()
            peak = max(peak, limiter.in_flight)
            await clock.sleep(0.5)
            limiter.on_success(permit)

    async def main() -> None:
        await asyncio.gather(*(consumer() for _ in range(256)))

    clock.run(main())
    # 20/s at 0.5 s needs 10 in flight; the bound is twice that, never the pool of 256.
    assert limiter.latency == pytest.approx(0.5, rel=0.01)
    assert limiter.max_in_flight in (20, 21)
    assert 10 <= peak <= 40
    assert limiter.counts.successes >= 0.95 * 20 * 20


async def test_try_acquire_and_ready_in_do_not_wait() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(10.0, clock=clock)
    assert limiter.ready_in() == 0.0
    permit = limiter.try_acquire()
    assert permit is not None and limiter.in_flight == 1
    assert limiter.try_acquire() is None  # the next token is 0.1 s away
    assert limiter.ready_in() == pytest.approx(0.1)
    clock.advance(0.1)
    assert limiter.try_acquire() is not None


async def test_a_permit_is_settled_once() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(5.0, clock=clock)
    permit = await limiter.acquire()
    limiter.on_success(permit)
    limiter.on_throttle(permit)
    limiter.on_error(permit)
    assert permit.outcome == "ok" and limiter.in_flight == 0
    assert limiter.counts.successes == 1 and limiter.counts.throttles == 0
    failed = await limiter.acquire()
    limiter.on_error(failed)
    assert failed.outcome == "error" and limiter.counts.errors == 1 and limiter.in_flight == 0


async def test_reading_the_limiter_changes_nothing() -> None:
    d = drive(100.0, 50.0)
    await d.run(5.0)
    limiter = d.limiter
    assert limiter.phase == "hold"
    d.clock.advance(limiter.settings.hold * 2)  # a probe is due, once someone asks for a permit
    first = limiter.snapshot()
    for _ in range(3):
        assert limiter.snapshot() == first
        assert limiter.rate == first["rate"] and limiter.max_in_flight == first["max_in_flight"]
    assert limiter.phase == "hold" and limiter.epoch == limiter.epoch
    permit = await limiter.acquire()
    assert limiter.phase == "probe"
    limiter.on_success(permit)


# --------------------------------------------------------------------------- ceiling -> cut


async def test_first_refusals_among_few_answers_do_not_cut() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(5.0, clock=clock)
    permit = await limiter.acquire()
    limiter.on_throttle(permit)
    assert permit.refused and permit.outcome == "error"  # not (yet) about the rate
    assert limiter.counts.throttles == 1 and limiter.counts.background_throttles == 1
    assert limiter.counts.cuts == 0 and limiter.rate == 5.0 and limiter.in_flight == 0


async def test_many_refusals_in_flight_cut_once_per_round_trip() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(40.0, clock=clock)
    permits = [await limiter.acquire() for _ in range(30)]  # 0.75 s at 40/s
    for permit in permits:
        limiter.on_throttle(permit)
    assert limiter.phase == "cut" and limiter.counts.cuts == 1
    assert limiter.rate == pytest.approx(20.0)
    # Sent well after the cut and refused too: a new round trip, a second cut.
    clock.advance(0.5)
    late = await limiter.acquire()
    clock.advance(0.2)
    limiter.on_throttle(late)
    assert limiter.counts.cuts == 2 and limiter.rate < 20.0
    assert limiter.in_flight == 0


async def test_a_cut_is_from_the_rate_actually_sent() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(100.0, clock=clock)
    permits = []
    for _ in range(30):  # the client only manages 10/s of its 100/s
        permits.append(await limiter.acquire())
        clock.advance(0.1)
    for permit in permits:
        limiter.on_throttle(permit)
    assert limiter.counts.cuts == 1
    assert limiter.rate == pytest.approx(5.0, rel=0.05)  # half of 10/s, not of 100/s


async def test_cut_then_hold_at_the_measured_quota() -> None:
    d = drive(100.0, 50.0)
    await d.run(4.0)
    assert d.seen("ceiling", "cut", "hold")
    assert d.limiter.counts.cuts == 1
    quota = d.limiter.quota_estimate
    assert quota is not None and 40.0 <= quota <= 50.0
    assert d.limiter.rate == pytest.approx(quota * 0.97)


# --------------------------------------------------------------------------- hold


async def test_in_hold_one_refusal_resyncs_and_a_second_within_strike_cuts() -> None:
    d = drive(100.0, 50.0)
    await d.run(5.0)
    limiter, clock = d.limiter, d.clock
    assert limiter.phase == "hold"
    cuts = limiter.counts.cuts
    first = await limiter.acquire()
    clock.advance(0.1)
    limiter.on_throttle(first)
    assert limiter.phase == "hold" and limiter.counts.cuts == cuts
    rate = limiter.rate
    second = await limiter.acquire()
    clock.advance(0.1)
    limiter.on_throttle(second)
    assert limiter.phase == "cut" and limiter.counts.cuts == cuts + 1
    assert limiter.rate <= rate * 0.5  # (of the rate sent over the last second, if lower)


# --------------------------------------------------------------------------- probe, verify


async def test_hold_probe_refused_hold_longer() -> None:
    d = drive(100.0, 50.0)
    await d.run(4.0 + 15.0 + 10.0)
    assert d.seen("cut", "hold", "probe", "hold")
    assert d.limiter.snapshot()["probes"] >= 1
    assert d.limiter.quota_estimate == pytest.approx(50.0, rel=0.03)  # measured again


async def test_probe_past_the_empty_point_verifies_and_passes_when_the_quota_rose() -> None:
    d = drive(100.0, 50.0)
    await d.run(30.0)  # measured, and calibrated by a refused probe
    assert d.limiter.quota_estimate == pytest.approx(50.0, rel=0.03)
    d.service.quota = 80.0
    d.phases.clear()
    await d.run(60.0)
    assert d.seen("probe", "verify", "probe", "hold")  # passed; a measuring probe
    assert d.limiter.snapshot()["probes_passed"] >= 1
    assert d.limiter.quota_estimate == pytest.approx(80.0, rel=0.05)


async def test_measuring_probe_held_at_the_ceiling_goes_back_to_it() -> None:
    d = drive(100.0, 50.0)
    await d.run(30.0)
    d.service.quota = 200.0  # the quota left: the ceiling is the limit
    d.phases.clear()
    await d.run(60.0)
    assert d.seen("probe", "verify", "probe", "ceiling")
    assert d.limiter.phase == "ceiling" and d.limiter.rate == 100.0
    assert d.limiter.quota_estimate is None


async def test_a_drop_and_its_end_jump_back_to_the_rate_before() -> None:
    d = drive(100.0, 100.0)
    await d.run(10.0)
    assert d.limiter.phase == "ceiling"
    d.service.quota = 50.0
    await d.run(10.0)
    assert d.limiter.quota_estimate == pytest.approx(50.0, rel=0.1)
    d.service.quota = 100.0
    d.phases.clear()
    await d.run(10.0)
    assert d.seen("probe", "verify", "ceiling")  # jumped straight back to the ceiling
    assert d.limiter.rate == 100.0


async def test_the_first_second_at_the_ceiling_is_not_remembered_as_taken() -> None:
    # The service's bucket starts full: a quota of 50 takes 80/s for over a second and a
    # half. That is no rate to come back to (probes every few seconds, each refused, for
    # minutes).
    d = drive(80.0, 50.0)
    await d.run(40.0)
    phases = [name for _, name in d.phases]
    assert phases[:3] == ["ceiling", "cut", "hold"]
    assert "ceiling" not in phases[1:]
    assert d.limiter.snapshot()["probes"] <= 4
    assert d.limiter.quota_estimate == pytest.approx(50.0, rel=0.03)


async def test_a_jump_undone_by_the_first_refusal() -> None:
    d = drive(100.0, 100.0)
    await d.run(10.0)
    d.service.quota = 50.0
    await d.run(10.0)
    limiter = d.limiter
    quota = limiter.quota_estimate
    assert limiter.phase == "hold" and quota is not None
    # The quota is back long enough for a probe to pass and jump back to the ceiling...
    d.service.quota = 100.0
    await d.run(10.0, until=lambda: limiter.phase == "ceiling")
    assert limiter.phase == "ceiling"
    # ...but it drops again: the first refusal of a request sent since undoes the jump.
    d.service.quota = 50.0
    d.service.tokens = 0.0
    await d.run(1.0, until=lambda: limiter.phase != "ceiling")
    assert limiter.phase == "hold" and limiter.counts.cuts == 1
    assert limiter.quota_estimate == pytest.approx(quota, rel=0.05)


async def test_an_error_answer_to_a_probe_neither_passes_nor_fails_it() -> None:
    d = drive(100.0, 50.0)
    await d.run(30.0)
    d.service.quota = 80.0
    limiter = d.limiter
    await d.run(60.0, until=lambda: limiter.phase == "verify")
    assert limiter.phase == "verify"
    probes = [p for _, _, p, _ in d.pending if p.probe]
    limiter.on_error(probes[0])
    assert limiter.phase == "verify"
    for probe in probes[1:]:
        limiter.on_success(probe)
    assert limiter.phase != "verify" and limiter.snapshot()["probes_passed"] == 1


# --------------------------------------------------------------------------- background


async def test_background_refusals_are_learned_and_the_cut_undone() -> None:
    d = drive(100.0, math.inf)
    d.service.quota = 10_000.0
    d.service.background_every = 10
    await d.run(10.0)
    limiter = d.limiter
    assert d.seen("ceiling", "cut", "ceiling")
    assert limiter.background_share == pytest.approx(0.1, abs=0.02)
    assert limiter.rate == 100.0 and limiter.counts.cuts == 1
    assert limiter.counts.background_throttles > 0.9 * (limiter.counts.throttles - 10)
