"""What was sent and how it was answered: the limiter's record of its own traffic.

Requests are counted by the tenth of a second they were sent in (a *bin*): how many were
sent, how many answered, refused, accepted, and the rate they were sent at. A bin is
*settled* once every request sent in it has answered. Shares of refusals are read from
settled bins only: refusals come back faster than answers (the service refuses before it
works), so a bin read while answers are still out over-counts them, and more so the more the
latency jitters. The recent requests themselves are kept too (in send order), for the
measures that need each one; and the round trip of accepted requests, averaged.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from rekbatch.calls.limiter.permit import Permit
from rekbatch.calls.limiter.settings import LimiterSettings

# Fields of a bin.
_SENT, _ANSWERED, _REFUSED, _OK, _RATE_SUM = range(5)
_COUNTED = (_SENT, _ANSWERED, _REFUSED, _OK)
_SLACK = 1e-6  # of a bin: 0.3 / 0.1 is 2.9999999999999996 in floats, and means 3


@dataclass(frozen=True, slots=True)
class Counts:
    """Requests sent over some bins, and how those answered."""

    sent: int = 0
    answered: int = 0
    refused: int = 0
    ok: int = 0
    seconds: float = 0.0
    """The time the bins cover."""

    @property
    def share(self) -> float:
        """Refused, of those answered."""
        return self.refused / self.answered if self.answered else 0.0

    @property
    def ok_rate(self) -> float:
        """Accepted per second of sending."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def _counts(total: list[float], seconds: float) -> Counts:
    return Counts(
        sent=int(total[_SENT]),
        answered=int(total[_ANSWERED]),
        refused=int(total[_REFUSED]),
        ok=int(total[_OK]),
        seconds=seconds,
    )


class Traffic:
    def __init__(self, settings: LimiterSettings) -> None:
        self._settings = settings
        self._step = settings.bin_seconds
        self._horizon = math.ceil(settings.bin_horizon / settings.bin_seconds)
        self._base = 0  # the index of the first bin kept
        self._bins: deque[list[float]] = deque()
        self._permits: deque[Permit] = deque()
        self.latency = settings.initial_latency
        """Average round trip of accepted requests, in seconds."""
        self._accepted = 0

    # -- recording ----------------------------------------------------------------------

    def _index(self, t: float) -> int:
        return math.floor(t / self._step + _SLACK)

    def _bin(self, t: float) -> list[float] | None:
        index = self._index(t)
        if not self._bins:
            self._base = index
        if index < self._base:
            return None  # older than the horizon
        while index >= self._base + len(self._bins):
            self._bins.append([0.0] * (_RATE_SUM + 1))
        while len(self._bins) > self._horizon:
            self._bins.popleft()
            self._base += 1
        return self._bins[index - self._base] if index >= self._base else None

    def on_send(self, permit: Permit) -> None:
        slot = self._bin(permit.sent_at)
        if slot is not None:
            slot[_SENT] += 1
            slot[_RATE_SUM] += permit.rate
        self._permits.append(permit)
        keep = max(self._settings.recent_seconds, self._settings.recent_trips * self.latency)
        while self._permits and self._permits[0].sent_at < permit.sent_at - keep:
            self._permits.popleft()

    def on_answer(self, permit: Permit, now: float) -> None:
        """``permit`` has its outcome."""
        index = self._index(permit.sent_at)
        if self._base <= index < self._base + len(self._bins):
            slot = self._bins[index - self._base]
            slot[_ANSWERED] += 1
            slot[_REFUSED] += permit.refused
            slot[_OK] += permit.outcome == "ok"
        if permit.outcome == "ok":
            self._accepted += 1
            trip = now - permit.sent_at
            if self._accepted == 1:
                self.latency = trip
            self.latency += self._settings.latency_weight * (trip - self.latency)

    # -- reading ------------------------------------------------------------------------

    def window(self, start: float, end: float, *, settled: bool = True) -> Counts:
        """The bins wholly between ``start`` and ``end`` (only the settled ones, unless
        ``settled`` is False)."""
        first = max(math.ceil(start / self._step - _SLACK) - self._base, 0)
        last = min(self._index(end) - self._base, len(self._bins))
        total = [0.0] * len(_COUNTED)
        bins = 0
        for i in range(first, last):
            slot = self._bins[i]
            if settled and slot[_ANSWERED] < slot[_SENT]:
                continue
            bins += 1
            for field in _COUNTED:
                total[field] += slot[field]
        return _counts(total, bins * self._step)

    def latest(self, now: float, seconds: float) -> Counts:
        """The last ``seconds`` of sending that has all been answered: settled bins, newest
        first, the bin still filling left out."""
        wanted = round(seconds / self._step)
        total = [0.0] * len(_COUNTED)
        bins = 0
        i = self._index(now) - 1 - self._base
        while bins < wanted and i >= 0:
            if i < len(self._bins):
                slot = self._bins[i]
                if slot[_ANSWERED] < slot[_SENT]:
                    i -= 1
                    continue
                for field in _COUNTED:
                    total[field] += slot[field]
            bins += 1  # a bin after the last send: nothing sent, nothing to wait for
            i -= 1
        return _counts(total, bins * self._step)

    def sent_rate(self, now: float, seconds: float) -> float:
        """Requests sent per second over the last ``seconds`` (whole bins), answered or not."""
        counts = self.window(now - seconds, now, settled=False)
        return counts.sent / counts.seconds if counts.seconds > 0 else 0.0

    def span_at(self, end: float, rate: float, longest: float) -> float:
        """How far back from ``end`` (at most ``longest`` seconds) requests went out at
        about ``rate`` or faster: the stretch whose answers tell about that rate."""
        last = min(self._index(end) - self._base, len(self._bins)) - 1
        first = max(self._index(end - longest) - self._base, 0)
        i = last
        while i >= first:
            slot = self._bins[i]
            if slot[_SENT] and slot[_RATE_SUM] / slot[_SENT] < self._settings.same_rate * rate:
                break
            i -= 1
        return (last - i) * self._step

    def permits_after(self, t: float) -> list[Permit]:
        """The recent requests sent after ``t``, in send order."""
        found: list[Permit] = []
        for permit in reversed(self._permits):
            if permit.sent_at <= t:
                break
            found.append(permit)
        found.reverse()
        return found

    def permits_between(self, start: float, end: float) -> Iterator[Permit]:
        """The recent requests sent from ``start`` up to (not including) ``end``."""
        for permit in self.permits_after(start - self._step):
            if start <= permit.sent_at < end:
                yield permit
