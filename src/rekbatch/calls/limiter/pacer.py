"""Pacing: the client's own token bucket, and the bound on requests in flight.

Pure: plain numbers and a time passed in. The limiter's ``acquire`` turns it into waiting.
"""

from __future__ import annotations

import math

from rekbatch.calls.limiter.settings import LimiterSettings

_SLACK = 1e-9  # float rounding: a token short by this much is a whole token


class Pacer:
    """Grants at ``rate`` a second, with at most ``settings.burst`` seconds of rate banked
    (at least one grant), and no more requests in flight than Little's law needs at the
    current rate and round trip, times ``settings.concurrency_margin``."""

    def __init__(self, rate: float, settings: LimiterSettings, now: float) -> None:
        self._settings = settings
        self._rate = rate
        self._tokens = self._depth(rate)
        self._at = now
        self.in_flight = 0

    @property
    def rate(self) -> float:
        return self._rate

    def _depth(self, rate: float) -> float:
        return max(1.0, rate * self._settings.burst)

    def tokens(self, now: float) -> float:
        """Grants banked at ``now`` (a fraction: part of the next one)."""
        refill = max(0.0, now - self._at) * self._rate
        return min(self._depth(self._rate), self._tokens + refill)

    def set_rate(self, rate: float, now: float, *, fresh: bool = False) -> None:
        """From ``now`` on, grant at ``rate``. ``fresh``: the rate starts a new epoch, and
        nothing banked at the old rate goes out in a burst at the new one."""
        self._tokens = min(self.tokens(now), self._depth(rate))
        self._at = max(self._at, now)
        self._rate = rate
        if fresh:
            self._tokens = min(self._tokens, 1.0)

    def max_in_flight(self, latency: float) -> int:
        need = self._rate * latency * self._settings.concurrency_margin
        return max(self._settings.min_concurrency, math.ceil(need))

    def ready_in(self, now: float, latency: float) -> float:
        """Seconds until the next grant: 0 if one can go now, infinite while the in-flight
        bound is reached (until a request in flight is settled)."""
        if self.in_flight >= self.max_in_flight(latency):
            return math.inf
        short = 1.0 - self.tokens(now)
        if short <= _SLACK:
            return 0.0
        return short / self._rate

    def take(self, now: float) -> None:
        """One grant, now (``ready_in`` said 0)."""
        self._tokens = self.tokens(now) - 1.0
        self._at = max(self._at, now)
        self.in_flight += 1

    def release(self) -> None:
        """A request in flight was settled."""
        self.in_flight -= 1
