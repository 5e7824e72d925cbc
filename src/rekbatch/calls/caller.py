"""The only place a ``Backend`` is called: the API's shared limiter, retries, and counters.

Every request waits for its API's ``AdaptiveLimiter``, goes to the backend, and settles the
permit with what happened. A retryable failure waits a jittered backoff and tries again, up
to ``max_attempts``; the outcome is the response or the last error, never an exception: a
failed call is a property of one image. Anything else a backend raises is a bug in it, and
propagates to the run's supervisor.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rekbatch.backends.base import Backend, ImageInput
from rekbatch.calls.limiter import AdaptiveLimiter
from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.calls.retry import RetryPolicy
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.errors import BackendError


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

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "calls": dict(self.calls),
            "ok": dict(self.ok),
            "throttles": dict(self.throttles),
            "retries": dict(self.retries),
            "failures": dict(self.failures),
        }


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
    ) -> None:
        self.backend = backend
        self.retry = retry
        self.stats = CallStats()
        self._max_tps = max_tps
        self._region = region
        self._clock = clock
        self._rng = rng or random.Random()
        self.limiters: dict[str, AdaptiveLimiter] = {}
        for api, rate in resolve_ceilings(max_tps, region, apis or []).items():
            self.limiters[api] = AdaptiveLimiter(rate, clock=clock, name=api)

    def limiter(self, api: str) -> AdaptiveLimiter:
        limiter = self.limiters.get(api)
        if limiter is None:
            # An API no operation declared up front (collections): its default ceiling.
            (rate,) = resolve_ceilings(self._max_tps, self._region, [api]).values()
            limiter = self.limiters[api] = AdaptiveLimiter(rate, clock=self._clock, name=api)
        return limiter

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> CallOutcome:
        limiter = self.limiters.get(api) or self.limiter(api)
        stats = self.stats
        clock = self._clock
        attempts = 0
        seconds = 0.0
        while True:
            attempts += 1
            permit = await limiter.acquire()
            stats.calls[api] += 1
            sent = clock.now()
            try:
                result = await self.backend.call(api, params, images)
            except BackendError as error:
                seconds += clock.now() - sent
                if error.kind == "throttle":
                    limiter.on_throttle(permit)
                    stats.throttles[api] += 1
                else:
                    limiter.on_error(permit)
                if not error.retryable or attempts >= self.retry.max_attempts:
                    stats.failures[api] += 1
                    return CallOutcome(None, error, attempts, seconds)
                stats.retries[api] += 1
                pause = self.retry.delay(attempts, self._rng)
                seconds += pause
                await clock.sleep(pause)
                continue
            except BaseException:
                limiter.on_error(permit)
                raise
            seconds += clock.now() - sent
            limiter.on_success(permit)
            stats.ok[api] += 1
            return CallOutcome(result, None, attempts, seconds)
