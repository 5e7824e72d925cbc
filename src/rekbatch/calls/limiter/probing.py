"""Probing: finding out whether the service takes more than the quota the limiter holds to.

A probe starts after a hold at the quota (``hold`` seconds, doubling to ``max_hold`` while
probes fail; ``recover_hold`` while below a rate the service took before a drop; shorter
too while the quota is a rough one). It first spends fast what the model of the service's
bucket says is banked, then *crawls* above the quota. Past the point where the model says the
bucket is empty, by more than the model's own error (``depth``), the probe stops sending
above the quota and waits for its answers:

- a refusal: the quota holds (and the refusal re-syncs the model and measures it again);
- all accepted: the service takes more. Then either straight back to a higher rate the
  service took before a drop, or, with none, a *measuring* probe: the crawl doubles every
  ``probe_double`` seconds until the service refuses (which measures the quota), or it is
  held at the ceiling (or that earlier rate) longer than any bucket could hide.

With a quota that is only a rough measure, the depth is infinite: every probe measures.
"""

from __future__ import annotations

import math

from rekbatch.calls.limiter.permit import Permit
from rekbatch.calls.limiter.settings import LimiterSettings


class Prober:
    def __init__(self, settings: LimiterSettings) -> None:
        self._settings = settings
        self.slow_hold = settings.hold
        """The hold between probes above a measured quota: doubles while they fail."""
        self.started_at = -math.inf
        self._crawl_at: float | None = None
        self._limit_at: float | None = None
        self._sends: list[Permit] = []
        self.probes = 0
        self.passed = 0

    # -- when ---------------------------------------------------------------------------

    def hold_time(self, quota: float, good: float | None, calibrated: bool) -> float:
        """Seconds to hold at ``quota`` before the next probe."""
        settings = self._settings
        if good is not None and quota < good:
            return settings.recover_hold
        if not calibrated:
            return min(self.slow_hold, settings.rough_hold)
        return self.slow_hold

    def start(self, now: float) -> None:
        self.started_at = now
        self._crawl_at = None
        self._limit_at = None
        self._sends = []
        self.probes += 1

    # -- how fast -----------------------------------------------------------------------

    def limit(self, quota: float, good: float | None, ceiling: float) -> float:
        """Where a measuring probe stops climbing: just under a higher rate the service
        took before a drop, or the ceiling."""
        if good is not None and good > quota:
            return good * (1.0 - self._settings.margin)
        return ceiling

    def _crawl(self, quota: float, good: float | None) -> float:
        settings = self._settings
        if good is not None and good > quota:  # recovering: test for the good rate sooner
            step = max(quota, good - quota) * settings.recover_crawl
        else:
            step = quota * settings.probe_crawl
        return max(settings.min_crawl, step)

    def rate(
        self,
        now: float,
        quota: float,
        banked: float,
        good: float | None,
        calibrated: bool,
        ceiling: float,
    ) -> float:
        """The probe's rate at ``now``, the model's bucket holding ``banked``."""
        settings = self._settings
        if banked >= 1.0 + settings.tolerance:
            return quota * (1.0 + settings.probe_fast)  # spend what the model says is banked
        crawl = self._crawl(quota, good)
        if calibrated:
            return quota + crawl
        since = 0.0 if self._crawl_at is None else now - self._crawl_at
        rate = quota + crawl * math.pow(2.0, since / settings.probe_double)
        return min(rate, self.limit(quota, good, ceiling))

    def advance(
        self,
        now: float,
        quota: float,
        banked: float,
        good: float | None,
        calibrated: bool,
        ceiling: float,
    ) -> bool:
        """Move the probe on in time; True when a measuring probe has been held at its
        limit for longer than the service's bucket could hide a lower quota (passed)."""
        settings = self._settings
        if banked >= 1.0 + settings.tolerance:
            return False
        if self._crawl_at is None:
            self._crawl_at = now
        if calibrated:
            return False
        limit = self.limit(quota, good, ceiling)
        if self.rate(now, quota, banked, good, calibrated, ceiling) < limit:
            self._limit_at = None
            return False
        if self._limit_at is None:
            self._limit_at = now
            return False
        return now - self._limit_at >= settings.server_burst

    # -- how far ------------------------------------------------------------------------

    def depth(
        self,
        now: float,
        capacity: float,
        calibrated: bool,
        synced: bool,
        anchor: float | None,
        error: float,
    ) -> float:
        """How many requests past the model's empty point a probe goes before it counts as
        passed: beyond what the model's own error could explain."""
        if not calibrated:
            return math.inf  # a rough quota: the probe goes on until the service refuses
        if not synced or anchor is None:
            return self._settings.probe_depth + capacity
        return self._settings.probe_depth + min(capacity, error * (now - anchor))

    def sent(self, permit: Permit) -> None:
        """``permit`` went out past the model's empty point."""
        self._sends.append(permit)

    def passed_with(self, permit: Permit) -> bool:
        """``permit``, one of this probe's, was answered: have all answered now, none
        refused for the rate, some accepted? (Failures and refusals within the background
        say nothing either way.)"""
        sends = self._sends
        if permit not in sends or not all(p.answered for p in sends):
            return False
        return all(p.outcome != "throttle" for p in sends) and any(p.outcome == "ok" for p in sends)

    # -- verdicts -----------------------------------------------------------------------

    def failed(self, lengthen: bool) -> None:
        """Refused: the quota holds. ``lengthen``: wait longer before the next one."""
        if lengthen:
            self.slow_hold = min(self._settings.max_hold, self.slow_hold * 2)

    def succeeded(self) -> None:
        """All accepted past the empty point: the service takes more."""
        self.count_pass()
        self.slow_hold = self._settings.hold

    def count_pass(self) -> None:
        self.passed += 1

    def shorten(self) -> None:
        """The quota changed: the next probe comes after the first hold again."""
        self.slow_hold = self._settings.hold
