"""Whole runs on virtual time through ``Caller``, the retry policy and the quota table.

Everything runs on virtual time: no real sleeps. The simulations (``tests.support.
simulated_service``) drive consumers through ``Caller.call`` against a simulated Rekognition
operation (a token bucket at the quota with one second of burst, lognormal latency, and the
faults of ``bench_faults``) and check the targets: at least 0.97 of the available quota in
steady state, 0.92 over a run where the quota halves (from 20 s to about 40 s), at most 1% of
calls throttled, back to 0.9 of the restored quota within 5 s (the median of three returns a
probe cycle apart); and, against refusals that are not
the quota, at least 0.85 of the fault-free rate with 10% throttles and 0.6 with 20% 500s,
10% throttles and 2% dropped connections, also when latency jitters as on a busy machine.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics

import pytest

from rekbatch.calls.classify import classify
from rekbatch.calls.quotas import api_name, default_tps, resolve_ceilings
from rekbatch.calls.retry import RetryPolicy
from rekbatch.errors import ConfigError
from tests.support.simulated_service import SimResult, simulate
from tests.support.virtual_clock import VirtualClock


def HALVED(q: float) -> list[tuple[float, float]]:
    """The quota halves at 20 s (another job shares it) and comes back at 40 s."""
    return [(20.0, q / 2), (40.0, q)]


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


# --------------------------------------------------------------------------- quota scenarios

QUOTAS = [20.0, 50.0, 100.0]


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_known_quota(q: float) -> None:
    result = simulate(quota=q, ceiling=q)
    assert result.steady_share is not None and result.steady_share >= 0.97
    assert result.quota_share is not None and result.quota_share >= 0.97
    assert result.throttled_share <= 0.01
    assert result.limiter["rate"] <= q


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_unknown_quota(q: float) -> None:
    result = simulate(quota=q, ceiling=2 * q)
    assert result.steady_share is not None and result.steady_share >= 0.97
    assert result.quota_share is not None and result.quota_share >= 0.97
    assert result.throttled_share <= 0.01
    estimate = result.limiter["quota_estimate"]
    assert isinstance(estimate, float) and estimate == pytest.approx(q, rel=0.03)


def halving_runs(q: float, **kwargs: float) -> list[SimResult]:
    """The quota halves at 20 s and comes back at three moments a probe cycle apart: when
    it comes back within the limiter's cycle of probes decides how soon it is found."""
    return [
        simulate(quota=q, schedule=[(20.0, q / 2), (back, q)], seed=seed, **kwargs)
        for seed, back in ((1, 40.0), (2, 40.75), (3, 41.5))
    ]


def assert_halving_targets(runs: list[SimResult]) -> None:
    for result in runs:
        assert result.quota_share is not None and result.quota_share >= 0.92
        assert result.throttled_share <= 0.01
        assert result.recovery is not None and result.recovery <= 6.0
    assert statistics.median(r.recovery or 0.0 for r in runs) <= 5.0


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_shared_quota_halves_and_comes_back(q: float) -> None:
    assert_halving_targets(halving_runs(q, ceiling=q))


@pytest.mark.parametrize("q", QUOTAS)
def test_simulation_unknown_and_shared_quota_with_fast_refusals(q: float) -> None:
    # tests.support.fake_rekognition answers throttles in 2 ms, accepted calls later.
    assert_halving_targets(halving_runs(q, ceiling=2 * q, throttle_latency=0.002))


@pytest.mark.parametrize("q", [20.0, 50.0])
def test_simulation_a_quota_far_below_the_ceiling_is_not_taken_for_background(q: float) -> None:
    result = simulate(quota=q, ceiling=400.0)
    assert result.limiter["background_share"] == 0.0
    assert result.steady_share is not None and result.steady_share >= 0.97
    assert result.limiter["quota_estimate"] == pytest.approx(q, rel=0.05)


def test_simulation_is_deterministic() -> None:
    first = simulate(quota=20.0, ceiling=20.0, schedule=HALVED(20.0), duration=30.0)
    second = simulate(quota=20.0, ceiling=20.0, schedule=HALVED(20.0), duration=30.0)
    assert (first.ok, first.refused) == (second.ok, second.refused)


# --------------------------------------------------------------------------- other refusals


@pytest.mark.parametrize(("ceiling", "noise"), [(400.0, 0.1), (100.0, 0.1), (400.0, 0.2)])
def test_simulation_random_throttles_far_from_the_quota_keep_the_rate(
    ceiling: float, noise: float
) -> None:
    # The service refuses a steady share whatever the rate (its own load); there is no
    # quota in reach. Cutting would only lose time: the limiter learns the background and
    # stays at the ceiling.
    result = simulate(quota=None, ceiling=ceiling, throttle_rate=noise, throttle_latency=0.002)
    best = ceiling * (1.0 - noise)  # what a client sending at the ceiling gets accepted
    assert result.ok_per_second >= 0.9 * best
    assert result.limiter["background_share"] == pytest.approx(noise, abs=0.03)
    assert result.limiter["rate"] == ceiling
    assert result.limiter["cuts"] <= 2


def test_simulation_random_throttles_and_a_quota_that_halves() -> None:
    # Both kinds at once: the background is learned, and the quota still rules the rate.
    result = simulate(
        quota=100.0,
        ceiling=100.0,
        schedule=HALVED(100.0),
        throttle_rate=0.1,
        throttle_latency=0.002,
    )
    assert result.limiter["background_share"] == pytest.approx(0.1, abs=0.03)
    assert result.quota_share is not None and result.quota_share >= 0.75
    assert result.recovery is not None and result.recovery <= 10.0


# bench_faults on virtual time: DetectLabels at a ceiling of 400/s, 32 consumers, 20 ms
# answers (refusals in 2 ms); the client spends 2.9 ms of processor per request (about 340
# a second at most), as rekbatch does against the fake.
FAULTS_RUN = {
    "quota": None,
    "ceiling": 400.0,
    "consumers": 32,
    "median": 0.02,
    "throttle_latency": 0.002,
    "duration": 20.0,
    "send_cost": 0.0017,
    "receive_cost": 0.0012,
}
# A busy machine: the client's process is off the processor 60% of the time and the
# service's 70%, in slices of 0.1 s on average; the service's answers cost it 1 ms each,
# refusals nothing. Latency jitters from 20 ms to a few hundred.
BUSY = {"busy": 0.6, "server_busy": 0.7, "server_cost": 0.001, "busy_slice": 0.1}
MIXES: dict[str, dict[str, float]] = {
    "10% throttles": {"throttle_rate": 0.1},
    "all three": {"throttle_rate": 0.1, "error_rate": 0.2, "drop_rate": 0.02},
}
LEAST_SHARE = {"10% throttles": 0.85, "all three": 0.6}


def fault_free_share(mix: str, machine: dict[str, float], seeds: list[int]) -> float:
    """Accepted calls under ``mix`` over the same runs' without faults, summed over seeds."""
    free = faulty = 0.0
    for seed in seeds:
        free += simulate(**FAULTS_RUN, **machine, seed=seed).ok_per_second
        faulty += simulate(**FAULTS_RUN, **machine, **MIXES[mix], seed=seed).ok_per_second
    return faulty / free


@pytest.mark.parametrize("mix", MIXES)
def test_simulation_faults_keep_their_share_of_the_fault_free_rate(mix: str) -> None:
    assert fault_free_share(mix, {}, seeds=[1]) >= LEAST_SHARE[mix]


@pytest.mark.parametrize("mix", MIXES)
def test_simulation_faults_keep_their_share_when_latency_jitters(mix: str) -> None:
    assert fault_free_share(mix, BUSY, seeds=[1, 2, 3]) >= LEAST_SHARE[mix]


def test_simulated_busy_machine_jitters_the_latency() -> None:
    def latencies(machine: dict[str, float]) -> tuple[list[float], float]:
        result = simulate(**{**FAULTS_RUN, "duration": 10.0}, **machine, trace_every=0.5)
        return [snapshot["latency_ms"] for _, snapshot in result.trace[2:]], result.ok_per_second

    quiet, quiet_rate = latencies({})
    busy, busy_rate = latencies(BUSY)
    assert max(quiet) < 1.2 * min(quiet)  # queued behind the client's own processor
    assert max(busy) > 3 * min(busy)
    assert busy_rate < 0.5 * quiet_rate


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
