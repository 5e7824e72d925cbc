"""The only place a ``Backend`` is called: the API's shared limiter, retries, and counters.

Every request waits for its API's ``AdaptiveLimiter``, goes to the backend, and settles the
permit with what happened. A retryable failure waits a jittered backoff and tries again, up
to ``max_attempts``; the outcome is the response or the last error, never an exception: a
failed call is a property of one image. Anything else a backend raises is a bug in it, and
propagates to the run's supervisor.

Over a network (``backend.network``) every request has a deadline that fits the service's
observed latency: ``TIMEOUT_FACTOR`` times the p99 of recent answers, within
``TIMEOUT_FLOOR`` and ``TIMEOUT_CEILING`` seconds, so a connection that dies without an
answer costs seconds. A failure of the connection itself (no answer, a reset, that
deadline) is retried without using up attempts, for as long as the endpoint is not down:
no call succeeding for ``unreachable_seconds`` raises ``EndpointUnreachable``, which stops
the run (resumable) instead of failing the rest of the bucket record by record.

With several Regions (``regions``, see ``calls.regions``) a stateless call takes a ``Route``
instead of its API's limiter: the same interface over every Region's limiter, and the
backend of the Region that granted the permit. A failure that was the Region's goes to
another Region without using an attempt.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rekbatch.backends.base import Backend, ImageInput
from rekbatch.calls.limiter import AdaptiveLimiter
from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.calls.retry import Reachability, RetryPolicy, is_connection_failure
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.errors import BackendError

if TYPE_CHECKING:
    from rekbatch.calls.regions import Regions, Route

TIMEOUT_FACTOR = 5.0
TIMEOUT_FLOOR = 3.0
TIMEOUT_CEILING = 60.0
TIMEOUT_UNKNOWN = 30.0  # before enough answers to know the latency
UNREACHABLE_SECONDS = 120.0


@dataclass(slots=True)
class CallOutcome:
    """A request's end: the response or the last error, the attempts it took, and the
    seconds spent on the wire and in backoff (not waiting for the first permit)."""

    result: dict[str, Any] | None
    error: BackendError | None
    attempts: int
    seconds: float


@dataclass
class CallStats:
    calls: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    throttles: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    connection_errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "calls": dict(self.calls),
            "ok": dict(self.ok),
            "throttles": dict(self.throttles),
            "retries": dict(self.retries),
            "failures": dict(self.failures),
            "connection_errors": dict(self.connection_errors),
        }


class LatencyWindow:
    """The p99 of an API's recent answers, recomputed every ``every`` answers."""

    def __init__(self, size: int = 512, every: int = 64) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._every = every
        self._count = 0
        self.p99: float | None = None

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._count += 1
        if self._count % self._every == 0 or (self.p99 is None and self._count >= 20):
            ordered = sorted(self._samples)
            self.p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def deadline(self) -> float:
        if self.p99 is None:
            return TIMEOUT_UNKNOWN
        return min(TIMEOUT_CEILING, max(TIMEOUT_FLOOR, TIMEOUT_FACTOR * self.p99))


class Caller:
    def __init__(
        self,
        backend: Backend,
        *,
        max_tps: float | dict[str, float] | None,
        region: str,
        retry: RetryPolicy,
        apis: list[str] | None = None,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        unreachable_seconds: float = UNREACHABLE_SECONDS,
        share: float = 1.0,
        applied: Mapping[str, float] | None = None,
    ) -> None:
        # ``share``: this process's part of the ceilings (1/N for one of N shards);
        # ``applied``: the account's quotas in ``region`` (Service Quotas), under ``max_tps``.
        self.backend = backend
        self._share = share
        self.retry = retry
        self.stats = CallStats()
        self.network = bool(getattr(backend, "network", False))
        self.reach = Reachability(
            getattr(backend, "endpoint_name", "the backend"), unreachable_seconds, clock
        )
        self.latency: dict[str, LatencyWindow] = {}
        self._max_tps = max_tps
        self._region = region
        self._clock = clock
        self._rng = rng or random.Random()
        self._applied = applied
        self.regions: Regions | None = None  # several Regions: the stateless calls' routes
        self.limiters: dict[str, AdaptiveLimiter] = {}
        for api, rate in resolve_ceilings(max_tps, region, apis or [], applied).items():
            self.limiters[api] = AdaptiveLimiter(rate * share, clock=clock, name=api)

    def limiter(self, api: str) -> AdaptiveLimiter:
        limiter = self.limiters.get(api)
        if limiter is None:
            # An API no operation declared up front (collections): its default ceiling.
            (rate,) = resolve_ceilings(self._max_tps, self._region, [api], self._applied).values()
            limiter = self.limiters[api] = AdaptiveLimiter(
                rate * self._share, clock=self._clock, name=api
            )
        return limiter

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> CallOutcome:
        limiter: AdaptiveLimiter | Route = self.limiters.get(api) or self.limiter(api)
        route = None if self.regions is None else self.regions.route(api, images)
        if route is not None:
            limiter = route  # every Region's limiter of the API, behind one
        latency = self.latency.get(api)
        if latency is None:
            latency = self.latency[api] = LatencyWindow()
        stats = self.stats
        clock = self._clock
        attempts = 0  # attempts that count towards max_attempts
        tries = 0
        seconds = 0.0
        while True:
            tries += 1
            permit = await limiter.acquire()
            stats.calls[api] += 1
            backend = self.backend if route is None else route.backend
            sent = clock.now()
            try:
                if self.network:
                    async with asyncio.timeout(latency.deadline()):
                        result = await backend.call(api, params, images)
                else:
                    result = await backend.call(api, params, images)
            except (BackendError, TimeoutError) as exc:
                error = exc if isinstance(exc, BackendError) else _deadline(latency)
                seconds += clock.now() - sent
                if error.kind == "throttle":
                    limiter.on_throttle(permit)
                    stats.throttles[api] += 1
                else:
                    limiter.on_error(permit)
                # The Region's failure, and another Region serves: no attempt used.
                moved = route is not None and route.failed(error)
                connection = is_connection_failure(error.code)
                if connection:
                    stats.connection_errors[api] += 1
                    self.reach.failed(f"{error.code}: {error.message}")
                elif not moved:
                    attempts += 1
                if not moved and (not error.retryable or attempts >= self.retry.max_attempts):
                    stats.failures[api] += 1
                    return CallOutcome(None, error, tries, seconds)
                stats.retries[api] += 1
                pause = self.retry.delay(min(tries, 8), self._rng)
                seconds += pause
                await clock.sleep(pause)
                continue
            except BaseException:
                limiter.on_error(permit)
                raise
            elapsed = clock.now() - sent
            seconds += elapsed
            latency.add(elapsed)
            self.reach.ok()
            limiter.on_success(permit)
            stats.ok[api] += 1
            return CallOutcome(result, None, tries, seconds)


def _deadline(latency: LatencyWindow) -> BackendError:
    return BackendError(
        "Timeout", f"no answer within {latency.deadline():.1f} s (5x the recent p99)", "transient"
    )
