"""The rate to come back to: a higher rate the service took before a drop.

When the quota drops (another job started sharing it), the limiter remembers what the
service took until then, for ``memory`` seconds. While below it, probes come every
``recover_hold`` seconds, and a probe that passes goes straight back to it (a *jump*). The
jump is undone by the first refusal of a request sent after it (the other job is still
there: back to the quota held before), and holds once it has lasted a few round trips.
"""

from __future__ import annotations

from rekbatch.calls.limiter.settings import LimiterSettings


class GoodRate:
    def __init__(self, settings: LimiterSettings, now: float) -> None:
        self._settings = settings
        self.rate: float | None = None
        """The rate remembered (requests per second), or None."""
        self._at = now
        self.error = 0.0
        """The error of the quota measure it came from."""
        self.calibrated = False
        """Whether it came from a precise measure of the quota (or was the ceiling)."""
        self.fallback: float | None = None
        """During a jump back to ``rate``: the quota held before it."""
        self.jumped_at = now

    def remember(self, rate: float, error: float, calibrated: bool, now: float) -> None:
        """The service took ``rate`` until a drop now; the highest such rate is kept."""
        if self.rate is None or rate > self.rate:
            self.rate = rate
            self.error = error
            self.calibrated = calibrated
        self._at = now

    def recall(self, now: float, quota: float, steady_for: float) -> float | None:
        """The rate remembered, forgotten once ``memory`` seconds old, or once the quota
        held has reached it and held ``reached_hold`` seconds."""
        settings = self._settings
        if self.rate is not None and (
            now - self._at > settings.memory
            or (quota >= self.rate and steady_for >= settings.reached_hold)
        ):
            self.rate = None
        return self.rate

    def forget(self) -> None:
        self.rate = None

    def forget_below(self, quota: float) -> None:
        """A new quota measured about as high (within ``same_rate_margins`` margins):
        nothing to come back to."""
        settings = self._settings
        near = settings.same_rate_margins * settings.margin
        if self.rate is not None and self.rate <= quota * (1.0 + near):
            self.rate = None

    def jump(self, quota: float, now: float) -> None:
        """Going back to the remembered rate from ``quota``."""
        self.fallback = quota
        self.jumped_at = now

    def jump_held(self, now: float, latency: float) -> bool:
        """Has a jump lasted long enough without a refusal to keep? (Ends it if so.)"""
        settings = self._settings
        if self.fallback is None:
            return False
        if now - self.jumped_at <= max(settings.jump_seconds, settings.jump_trips * latency):
            return False
        self.fallback = None
        return True

    def end_jump(self) -> None:
        self.fallback = None
