"""The rate limiter, retry policy and quota table; and a virtual-time simulation of a whole run.

Everything runs on fake or virtual time: no real sleeps. The simulation drives 64 consumers
through ``AdaptiveLimiter.request()`` against a simulated Rekognition operation (a token bucket
at the quota with one second of burst, lognormal latency) for 60 virtual seconds, and checks
the targets: at least 0.97 of the available quota in steady state, 0.92 over a run where the
quota halves (20 s to 40 s), at most 1% of calls throttled, and back to 0.9 of the restored
quota within 5 s.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from rekbatch.calls.classify import classify
from rekbatch.calls.limiter import AdaptiveLimiter, Permit
from rekbatch.calls.quotas import api_name, default_tps, resolve_ceilings
from rekbatch.calls.retry import RetryPolicy
from rekbatch.errors import BackendError, ConfigError
from tests.support.virtual_clock import FakeClock, VirtualClock

# --------------------------------------------------------------------------- virtual clock


def test_virtual_clock_jumps_to_the_next_timer() -> None:
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    async def main() -> float:
        await asyncio.gather(sleeper("b", 2.5), sleeper("a", 1.0), sleeper("c", 3600.0))
        return clock.now()

    assert clock.run(main()) == 3600.0
    assert woke == [("a", 1.0), ("b", 2.5), ("c", 3600.0)]


def test_virtual_clock_reports_a_deadlock_and_bounds_its_steps() -> None:
    async def stuck() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(RuntimeError, match="deadlock"):
        VirtualClock().run(stuck())

    async def spin() -> None:
        while True:  # noqa: ASYNC110 - a livelock on purpose
            await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="loop steps"):
        VirtualClock(max_steps=1000).run(spin())


# --------------------------------------------------------------------------- limiter basics


async def test_starts_at_the_ceiling_and_spaces_tokens() -> None:
    clock = FakeClock(100.0)
    limiter = AdaptiveLimiter(10.0, clock=clock, name="DetectFaces")
    assert limiter.rate == limiter.ceiling == 10.0
    sent = []
    for _ in range(20):
        permit = await limiter.acquire()
        sent.append(permit.sent_at)
        limiter.on_success(permit)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps == pytest.approx([0.1] * 19)
    snap = limiter.snapshot()
    assert snap["name"] == "DetectFaces"
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
        async with limiter.request():
            order.append(i)
            times.append(clock.now())
            await clock.sleep(0.05)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(200)))

    clock.run(main())
    assert order == list(range(200))
    burst = max(1.0, 20.0 * limiter.burst)
    for start in times:
        in_window = sum(1 for t in times if start <= t < start + 1.0)
        assert in_window <= 20.0 + burst
    assert times[-1] == pytest.approx(199 / 20.0, abs=0.1)


async def test_many_in_flight_refusals_cut_once_per_round_trip() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(40.0, clock=clock)
    permits = [await limiter.acquire() for _ in range(30)]
    assert limiter.in_flight == 30
    for permit in permits:
        limiter.on_throttle(permit)
    assert limiter.cuts == 1
    assert limiter.throttles == 30
    assert limiter.rate == pytest.approx(20.0)
    # A request sent well after the cut and refused too: a new round trip, a second cut.
    clock.advance(0.5)
    late = await limiter.acquire()
    clock.advance(0.2)
    limiter.on_throttle(late)
    assert limiter.cuts == 2
    assert limiter.rate < 20.0
    assert limiter.in_flight == 0


async def test_request_context_settles_the_permit_once() -> None:
    clock = FakeClock()
    limiter = AdaptiveLimiter(5.0, clock=clock)
    async with limiter.request() as permit:
        assert limiter.in_flight == 1
    assert permit.outcome == "ok" and limiter.in_flight == 0
    limiter.on_throttle(permit)  # already settled: ignored
    assert limiter.throttles == 0

    with pytest.raises(BackendError):
        async with limiter.request() as permit:
            raise BackendError("ThrottlingException", "slow down", "throttle")
    # Refused, and counted; one refusal among no other answers does not cut the rate yet.
    assert permit.refused and limiter.throttles == 1 and limiter.in_flight == 0
    assert limiter.cuts == 0 and limiter.rate == 5.0

    with pytest.raises(BackendError):
        async with limiter.request() as permit:
            raise BackendError("InvalidImageFormatException", "bad", "permanent")
    assert permit.outcome == "error" and limiter.errors == 1

    with pytest.raises(ZeroDivisionError):
        async with limiter.request() as permit:
            _ = 1 / 0
    assert permit.outcome == "error" and limiter.in_flight == 0


def test_in_flight_follows_littles_law_not_the_pool_size() -> None:
    clock = VirtualClock()
    limiter = AdaptiveLimiter(20.0, clock=clock)
    peak = 0

    async def consumer() -> None:
        nonlocal peak
        while clock.now() < 20.0:
            async with limiter.request():
                peak = max(peak, limiter.in_flight)
                await clock.sleep(0.5)

    async def main() -> None:
        await asyncio.gather(*(consumer() for _ in range(256)))

    clock.run(main())
    # 20/s at 0.5 s needs 10 in flight; the bound is twice that, never the pool of 256.
    assert limiter.latency == pytest.approx(0.5, rel=0.01)
    assert limiter.max_in_flight in (20, 21)
    assert 10 <= peak <= 40
    assert limiter.successes >= 0.95 * 20 * 20


def test_climbs_back_once_refusals_stop() -> None:
    """A short burst of refusals (another job passing by): cut, then back to the ceiling."""
    clock = VirtualClock()
    limiter = AdaptiveLimiter(50.0, clock=clock)
    trace: list[tuple[float, float]] = []

    async def consumer() -> None:
        while True:
            try:
                async with limiter.request():
                    refused = 10.0 <= clock.now() < 10.3
                    await clock.sleep(0.1)
                    if refused:
                        raise BackendError("ThrottlingException", "busy", "throttle")
            except BackendError:
                await clock.sleep(0.05)

    async def tracer() -> None:
        while True:
            trace.append((clock.now(), limiter.rate))
            await clock.sleep(0.1)

    async def main() -> None:
        tasks = [asyncio.create_task(consumer()) for _ in range(32)]
        tasks.append(asyncio.create_task(tracer()))
        await clock.sleep(20.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    clock.run(main())
    assert all(rate == 50.0 for t, rate in trace if t < 10.0)
    assert min(rate for t, rate in trace if 10.0 <= t < 11.0) <= 25.0
    assert 1 <= limiter.cuts <= 3  # at most once per 0.1 s round trip while refused
    back = min(t for t, rate in trace if t > 10.3 and rate >= 0.9 * 50.0)
    assert back - 10.3 <= 5.0
    assert all(rate >= 0.9 * 50.0 for t, rate in trace if t >= back)
    assert limiter.rate == 50.0


# --------------------------------------------------------------------------- simulation


@dataclass
class SimResult:
    accepted: int
    throttled: int
    available: float
    steady_ratio: float
    ratio: float
    share: float
    recovery: float | None
    limiter: dict[str, Any]


class SimulatedService:
    """One Rekognition operation: a token bucket at ``quota(t)`` with ``burst`` seconds of
    depth, starting full and checked when the request arrives; replies after a lognormal
    latency (throttle replies too, or after ``throttle_latency`` if given)."""

    def __init__(
        self,
        clock: VirtualClock,
        quota: Callable[[float], float],
        changes: list[float],
        *,
        seed: int,
        burst: float = 1.0,
        median: float = 0.15,
        sigma: float = 0.5,
        throttle_latency: float | None = None,
        noise: float = 0.0,
    ) -> None:
        self.clock = clock
        self.noise = noise
        self.quota = quota
        self.changes = changes
        self.burst = burst
        self.rng = random.Random(seed)
        self.mu = math.log(median)
        self.sigma = sigma
        self.throttle_latency = throttle_latency
        self.tokens = quota(0.0) * burst
        self.at = 0.0
        self.log: list[tuple[float, bool]] = []

    def _take(self, now: float) -> bool:
        for t in [c for c in self.changes if self.at < c <= now] + [now]:
            rate = self.quota(self.at)
            self.tokens = min(rate * self.burst, self.tokens + (t - self.at) * rate)
            self.at = t
            self.tokens = min(self.tokens, self.quota(t) * self.burst)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    async def call(self) -> None:
        busy = self.noise > 0 and self.rng.random() < self.noise
        ok = not busy and self._take(self.clock.now())
        self.log.append((self.clock.now(), ok))
        if busy:
            await self.clock.sleep(self.throttle_latency or 0.002)
            raise BackendError("ThrottlingException", "busy", "throttle")
        latency = self.rng.lognormvariate(self.mu, self.sigma)
        if not ok and self.throttle_latency is not None:
            latency = self.throttle_latency
        await self.clock.sleep(latency)
        if not ok:
            raise BackendError("ProvisionedThroughputExceededException", "over quota", "throttle")


def simulate(
    q: float,
    *,
    ceiling: float | None = None,
    halve: bool = False,
    seed: int = 7,
    consumers: int = 64,
    duration: float = 60.0,
    throttle_latency: float | None = None,
    noise: float = 0.0,
) -> SimResult:
    clock = VirtualClock()
    changes = [20.0, 40.0] if halve else []

    def quota(t: float) -> float:
        return q / 2 if halve and 20.0 <= t < 40.0 else q

    service = SimulatedService(
        clock, quota, changes, seed=seed, throttle_latency=throttle_latency, noise=noise
    )
    limiter = AdaptiveLimiter(ceiling or q, clock=clock, name="sim")
    policy = RetryPolicy()
    rng = random.Random(seed + 1)

    async def consumer() -> None:
        attempt = 0
        while True:
            try:
                async with limiter.request():
                    await service.call()
                attempt = 0
            except BackendError as exc:
                attempt += 1
                if not policy.should_retry(exc.kind, attempt):
                    attempt = 0
                    continue
                await clock.sleep(policy.delay(attempt, rng))

    async def main() -> None:
        tasks = [asyncio.create_task(consumer()) for _ in range(consumers)]
        await clock.sleep(duration)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    clock.run(main())
    log = [(t, ok) for t, ok in service.log if t < duration]
    accepted = sum(1 for _, ok in log if ok)
    throttled = len(log) - accepted
    available = q * duration - (q / 2 * 20.0 if halve else 0.0)
    warm = 5.0
    steady = sum(1 for t, ok in log if ok and t >= warm) / (available - q * warm)
    recovery = None
    if halve:
        bins = [0] * (int(duration * 10) + 1)
        for t, ok in log:
            bins[int(t * 10)] += ok
        for i in range(400, int(duration * 10)):
            if sum(bins[i - 9 : i + 1]) >= 0.9 * q:
                recovery = (i + 1) / 10 - 40.0
                break
    return SimResult(
        accepted,
        throttled,
        available,
        steady,
        accepted / available,
        throttled / max(1, len(log)),
        recovery,
        limiter.snapshot(),
    )


QUOTAS = [20.0, 50.0, 100.0]


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_known_quota(q: float) -> None:
    result = simulate(q)
    assert result.steady_ratio >= 0.97
    assert result.ratio >= 0.97
    assert result.share <= 0.01
    assert result.limiter["rate"] <= q


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_unknown_quota(q: float) -> None:
    result = simulate(q, ceiling=2 * q)
    assert result.steady_ratio >= 0.97
    assert result.ratio >= 0.97
    assert result.share <= 0.01
    estimate = result.limiter["quota_estimate"]
    assert isinstance(estimate, float) and estimate == pytest.approx(q, rel=0.03)


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_shared_quota_halves_and_comes_back(q: float) -> None:
    result = simulate(q, halve=True)
    assert result.ratio >= 0.92
    assert result.share <= 0.01
    assert result.recovery is not None and result.recovery <= 5.0


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_unknown_and_shared_quota_with_fast_refusals(q: float) -> None:
    # tests.support.fake_rekognition answers throttles in 2 ms, accepted calls later.
    result = simulate(q, ceiling=2 * q, halve=True, throttle_latency=0.002)
    assert result.ratio >= 0.92
    assert result.share <= 0.01
    assert result.recovery is not None and result.recovery <= 5.0


@pytest.mark.parametrize(("ceiling", "noise"), [(400.0, 0.1), (100.0, 0.1), (400.0, 0.2)])
def test_simulation_random_throttles_far_from_the_quota_keep_the_rate(
    ceiling: float, noise: float
) -> None:
    # The service refuses a steady share whatever the rate (its own load); the quota is
    # far away. Cutting would only lose time: the limiter learns the background and stays.
    result = simulate(1000.0, ceiling=ceiling, noise=noise)
    accepted_per_second = result.accepted / 60.0
    best = ceiling * (1.0 - noise)  # what a client sending at the ceiling gets accepted
    assert accepted_per_second >= 0.9 * best
    assert result.limiter["background_share"] == pytest.approx(noise, abs=0.03)
    assert result.limiter["rate"] == ceiling
    assert result.limiter["cuts"] <= 2


@pytest.mark.parametrize("q", [20.0, 50.0])
def test_simulation_a_quota_far_below_the_ceiling_is_not_taken_for_background(q: float) -> None:
    result = simulate(q, ceiling=400.0)
    assert result.limiter["background_share"] == 0.0
    assert result.steady_ratio >= 0.97
    assert result.limiter["quota_estimate"] == pytest.approx(q, rel=0.05)


def test_simulation_random_throttles_and_a_quota_that_halves() -> None:
    # Both kinds at once: the background is learned, and the quota still rules the rate.
    result = simulate(100.0, halve=True, noise=0.1)
    assert result.limiter["background_share"] == pytest.approx(0.1, abs=0.03)
    assert result.ratio >= 0.75
    assert result.recovery is not None and result.recovery <= 10.0


def test_simulation_is_deterministic() -> None:
    first = simulate(20.0, halve=True, duration=30.0)
    second = simulate(20.0, halve=True, duration=30.0)
    assert (first.accepted, first.throttled) == (second.accepted, second.throttled)


# --------------------------------------------------------------------------- retry


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("ProvisionedThroughputExceededException", 400, "throttle"),
        ("ThrottlingException", 500, "throttle"),
        ("ThrottlingException", 400, "throttle"),
        ("Throttling", 400, "throttle"),
        ("TooManyRequestsException", 429, "throttle"),
        ("RequestLimitExceeded", 503, "throttle"),
        ("LimitExceededException", 400, "throttle"),
        ("SomethingNew", 429, "throttle"),
        ("InternalServerError", 500, "transient"),
        ("ServiceUnavailable", 503, "transient"),
        ("ServiceUnavailableException", 503, "transient"),
        (None, 502, "transient"),
        ("WeirdGatewayThing", 504, "transient"),
        ("ReadTimeoutError", None, "transient"),
        ("ConnectionResetError", None, "transient"),
        ("EndpointConnectionError", None, "transient"),
        (None, None, "transient"),
        ("RequestTimeout", 408, "transient"),
        ("InvalidImageFormatException", 400, "permanent"),
        ("ImageTooLargeException", 400, "permanent"),
        ("InvalidParameterException", 400, "permanent"),
        ("InvalidS3ObjectException", 400, "permanent"),
        ("AccessDeniedException", 400, "permanent"),
        ("ResourceNotFoundException", 400, "permanent"),
        ("SomeOtherClientError", 400, "permanent"),
        (None, 403, "permanent"),
    ],
)
def test_classify(code: str | None, status: int | None, kind: str) -> None:
    assert classify(code, status) == kind


def test_backoff_stays_in_bounds_and_grows() -> None:
    policy = RetryPolicy(max_attempts=8, base=0.05, cap=20.0)
    rng = random.Random(1)
    means = []
    for attempt in range(1, 12):
        bound = min(20.0, 0.05 * 2**attempt)
        assert policy.ceiling(attempt) == pytest.approx(bound)
        draws = [policy.delay(attempt, rng) for _ in range(400)]
        assert all(0.0 <= d <= bound for d in draws)
        means.append(sum(draws) / len(draws))
    assert all(b > a for a, b in itertools.pairwise(means[:9]))
    assert means[-1] == pytest.approx(10.0, rel=0.15)  # capped: uniform on [0, 20]

    decorrelated = RetryPolicy(jitter="decorrelated")
    for attempt in range(1, 20):
        d = decorrelated.delay(attempt, rng)
        assert 0.05 <= d <= 20.0


def test_should_retry() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry("throttle", 1) and policy.should_retry("transient", 2)
    assert not policy.should_retry("transient", 3)
    assert not policy.should_retry("permanent", 1)
    assert not RetryPolicy(max_attempts=1).should_retry("throttle", 1)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base=1.0, cap=0.5)


# --------------------------------------------------------------------------- quotas


def test_default_tps_table() -> None:
    for region in ("us-east-1", "us-west-2", "eu-west-1"):
        assert default_tps("DetectFaces", region) == 100
        assert default_tps("CompareFaces", region) == 100
        assert default_tps("DetectLabels", region) == 50
        assert default_tps("SearchFacesByImage", region) == 50
        assert default_tps("DetectProtectiveEquipment", region) == 5
    for region in ("eu-central-1", "ap-southeast-2", "us-east-2"):
        assert default_tps("DetectFaces", region) == 25
        assert default_tps("DetectText", region) == 5
        assert default_tps("RecognizeCelebrities", region) == 5
    assert default_tps("DetectModerationLabels", "us-east-1") == 50
    assert default_tps("IndexFaces", "eu-west-1") == 50
    assert default_tps("SomeFutureApi", "us-east-1") == 5
    assert default_tps("DetectFaces", "mars-north-1") == 25


def test_resolve_ceilings() -> None:
    apis = ["DetectFaces", "DetectLabels", "SearchFacesByImage", "IndexFaces", "CompareFaces"]
    assert resolve_ceilings(None, "us-east-1", apis) == {
        "DetectFaces": 100,
        "DetectLabels": 50,
        "SearchFacesByImage": 50,
        "IndexFaces": 50,
        "CompareFaces": 100,
    }
    assert resolve_ceilings(12.5, "us-east-1", apis[:2]) == {
        "DetectFaces": 12.5,
        "DetectLabels": 12.5,
    }
    limits = {"detect_faces": 40, "search_faces": 8, "IndexFaces": 3, "compare_faces": 60}
    assert resolve_ceilings(limits, "eu-west-2", apis) == {
        "DetectFaces": 40,
        "DetectLabels": 5,
        "SearchFacesByImage": 8,
        "IndexFaces": 3,
        "CompareFaces": 60,
    }
    assert resolve_ceilings({"search_faces_by_image": 9}, "us-east-1", ["SearchFacesByImage"]) == {
        "SearchFacesByImage": 9
    }
    assert api_name("detect_labels") == "DetectLabels" and api_name("nope") is None
    with pytest.raises(ConfigError, match=r"max_tps\.detect_fcaes"):
        resolve_ceilings({"detect_fcaes": 10}, "us-east-1", apis)
    with pytest.raises(ConfigError):
        resolve_ceilings(0, "us-east-1", apis)


def test_permit_is_a_plain_record() -> None:
    permit = Permit(sent_at=1.0, epoch=0, rate=5.0, booked=False)
    assert permit.outcome is None and not permit.probe
