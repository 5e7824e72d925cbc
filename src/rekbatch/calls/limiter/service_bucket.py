"""The model of the service's token bucket: how many requests it would take right now.

Rekognition's quota is a token bucket: it refills at the quota and holds ``server_burst``
seconds of it. Once the limiter has a quota, it keeps the same bucket on its side: each
request sent books a token, a refusal hands its token back (the service did not spend it),
and a refusal also says the bucket was *empty when that request arrived*, which re-syncs the
model there. Running a little under the quota, the model banks tokens as the service does; a
probe spends them first, then goes past the point where the model says the bucket is empty.
"""

from __future__ import annotations

from rekbatch.calls.limiter.permit import Permit
from rekbatch.calls.limiter.settings import LimiterSettings


class ServiceBucketModel:
    def __init__(self, settings: LimiterSettings, now: float) -> None:
        self._settings = settings
        self.quota: float | None = None
        """The refill rate modelled: the quota in use (None: no model, nothing booked)."""
        self._tokens = 0.0
        self._at = now
        self.basis = now
        """Only requests sent after this are in the model (a token handed back for an
        earlier one would count twice)."""
        self.synced = False
        """Re-synced at a refusal since the quota was set: the level is known, not guessed."""

    def capacity(self, quota: float | None = None) -> float:
        rate = self.quota if quota is None else quota
        return max(1.0, (rate or 0.0) * self._settings.server_burst)

    def tokens(self, now: float) -> float:
        """What the bucket holds at ``now``, by the model."""
        if self.quota is None:
            return 0.0
        refill = max(0.0, now - self._at) * self.quota
        return min(self.capacity(), self._tokens + refill)

    def _refill(self, now: float) -> None:
        self._tokens = self.tokens(now)
        self._at = max(self._at, now)

    def set_quota(self, quota: float | None, now: float) -> None:
        """Refill at the old quota up to ``now``, at ``quota`` from then on."""
        self._refill(now)
        self.quota = quota

    def empty(self, now: float) -> None:
        """The bucket is empty at ``now`` (after a cut, or a quota just measured)."""
        self._tokens = 0.0
        self._at = now
        self.basis = now

    def book(self, now: float) -> float | None:
        """Count one request sent now; returns what the bucket held before it, or None
        when nothing is modelled."""
        if self.quota is None:
            return None
        self._refill(now)
        before = self._tokens
        self._tokens -= 1.0
        return before

    def hand_back(self, permit: Permit) -> None:
        """``permit`` was refused or failed: the service did not spend its token."""
        if permit.booked and self.quota is not None and permit.sent_at > self.basis:
            self._tokens += 1.0

    def resync(self, refused_at: float, spent: int, now: float, *, newer: bool) -> None:
        """A request sent at ``refused_at`` was refused: the bucket was empty then. Since
        then it refilled for ``now - refused_at`` and ``spent`` requests sent after it were
        accepted or are still out. ``newer``: this refusal is later than any before it, so
        the model restarts from it; otherwise it only bounds the model from above."""
        quota = self.quota
        if quota is None:
            return
        bound = (now - refused_at) * quota - spent
        self._refill(now)
        if newer:
            self._tokens = min(self.capacity(), self._settings.resync_level + bound)
            self.basis = refused_at
        else:
            self._tokens = min(self._tokens, 1.0 + bound)
        self.synced = True
