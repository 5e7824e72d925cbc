"""Measuring the quota from the service's own refusals.

A refusal for the quota means the service's bucket was empty when that request arrived. So
between two refusals the bucket went from empty to empty, and the requests it accepted in
between are exactly what it refilled: the quota is *accepted / time between the refusals*.
Two measures use this:

- ``RefusalMeter``: across refusals at least ``calibration_span`` seconds apart (probes
  that end in one refusal each, say), a measure precise to about a request over the span;
  unless a bucket refilling at that rate would have overflowed in between (it banks no more
  than it holds), which makes the measure only a lower bound.
- ``CutWindow``: after a cut, the requests sent while the service was refusing (from the
  first refusal to the cut) and the answers to those sent after it: a rougher measure, leaned
  low, since a rate still too high costs throttles and another cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rekbatch.calls.limiter.permit import Permit
from rekbatch.calls.limiter.settings import LimiterSettings


def overflowed(
    start: float,
    end: float,
    window: list[Permit],
    quota: float,
    capacity: float,
    settings: LimiterSettings,
) -> bool:
    """Would a bucket refilled at ``quota`` (holding ``capacity``) have overflowed between
    ``start`` and ``end``, where it was empty, with the requests of ``window`` in between?"""
    slack = settings.resync_level  # a refusal comes somewhere within its request's slot
    tokens, at = slack, start
    for t, accepted in [*((p.sent_at, p.outcome == "ok") for p in window), (end, False)]:
        tokens += (t - at) * quota
        at = t
        if tokens + slack >= capacity:
            return True
        if accepted:
            tokens -= 1.0
    return False


class RefusalMeter:
    """The last refusal (the *anchor*: the service's bucket empty), the requests sent since,
    and a measure between two anchors waiting for its answers."""

    def __init__(self, settings: LimiterSettings) -> None:
        self._settings = settings
        self.anchor: float | None = None
        self._since: list[Permit] = []
        self._pending: tuple[float, float, list[Permit]] | None = None
        self._unanswered = 0

    def clear(self) -> None:
        """Forget the anchor and any measure in progress (the quota changed)."""
        self.anchor = None
        self._since = []
        self._pending = None

    def on_send(self, permit: Permit) -> None:
        if self.anchor is not None:
            self._since.append(permit)

    def on_answer(self, permit: Permit) -> None:
        pending = self._pending
        if pending is not None and pending[0] < permit.sent_at <= pending[1]:
            self._unanswered -= 1

    def on_refusal(self, refused_at: float, sent_since: list[Permit]) -> bool:
        """A refusal for the rate of a request sent at ``refused_at``; ``sent_since`` the
        recent requests sent after it. Returns whether it is newer than the anchor (the
        model of the service's bucket restarts from it)."""
        start = self.anchor
        if start is None:
            self._since = list(sent_since)
            self.anchor = refused_at
            return True
        if refused_at <= start:
            return False
        if refused_at - start >= self._settings.calibration_span and self._pending is None:
            window = [p for p in self._since if p.sent_at <= refused_at]
            self._pending = (start, refused_at, window)
            self._unanswered = sum(1 for p in window if not p.answered)
        self._since = [p for p in self._since if p.sent_at > refused_at]
        self.anchor = refused_at
        return True

    def measured(self) -> tuple[float, float, list[Permit]] | None:
        """A measure between two anchors, once all its requests have answered: (first
        anchor, second anchor, the requests sent between). Taken once."""
        if self._pending is None or self._unanswered > 0:
            return None
        pending, self._pending = self._pending, None
        return pending


class CutWindow:
    """After a cut: the requests sent from the first refusal (``start``) to the latest cut
    (``end``), which all met the old rate, and the answers to those sent after it."""

    def __init__(self, start: float, end: float, from_rate: float, sent: Iterable[Permit]):
        self.start = start
        self.end = end
        self.from_rate = from_rate
        """The rate the first refused request was sent at."""
        self._window: list[Permit] = []
        self._unanswered = 0
        self._after: list[Permit] = []
        self.extend(end, sent)

    def extend(self, end: float, sent: Iterable[Permit]) -> None:
        """Cut again at ``end``: everything sent up to it belongs to the window."""
        self.end = end
        self._window = [p for p in sent if self.start <= p.sent_at < end]
        self._unanswered = sum(1 for p in self._window if not p.answered)
        self._after = []

    def on_answer(self, permit: Permit) -> None:
        if self.start <= permit.sent_at < self.end:
            self._unanswered -= 1
        elif permit.sent_at >= self.end:
            self._after.append(permit)

    def ready(self, now: float, latency: float, settings: LimiterSettings) -> bool:
        """Everything in the window has answered, and enough sent after the cut (or it has
        been a while)."""
        if self._unanswered > 0:
            return False
        after = self._after
        if len(after) >= settings.cut_answers:
            return True
        return bool(after) and now - self.end > settings.cut_wait_trips * latency

    def refused(self) -> list[Permit]:
        return [p for p in (*self._window, *self._after) if p.outcome == "throttle"]

    def measure(
        self,
        blind_rate: float,
        floor: float,
        echo: float,
        within_background: Callable[[int, int], bool],
        settings: LimiterSettings,
    ) -> tuple[float, float]:
        """(quota, its error): what the service accepted between the first and the last
        refusal (or over the window, if refused once) per second, leaned low by half its
        error (the blind rate if that leaves nothing); at least ``floor``, and at least
        ``blind_rate`` if what was sent ``echo`` seconds or more after the cut (earlier
        ones met a bucket emptied before it) was refused no more than the background
        refuses (``within_background(refused, answered)``); at most the rate refused."""
        everything = (*self._window, *self._after)
        refused = self.refused()
        first = min((p.sent_at for p in refused), default=self.start)
        last = max((p.sent_at for p in refused), default=self.start)
        if last > first:
            span = last - first
            accepted = sum(1 for p in everything if first < p.sent_at < last and p.outcome == "ok")
        else:
            window = self._window
            span = window[-1].sent_at - window[0].sent_at if window else 0.0
            span += 1.0 / max(self.from_rate, settings.min_rate)  # one request's slot
            accepted = sum(1 for p in window if p.outcome == "ok")
        error = max(settings.cut_error * accepted / span, 1.0 / span)
        late = [p for p in self._after if p.sent_at >= self.end + echo]
        refused_late = sum(1 for p in late if p.refused)
        if within_background(refused_late, len(late)):
            floor = max(floor, blind_rate)
        measured = accepted / span - error / 2
        if measured <= 0:
            measured = blind_rate  # too few requests to measure anything: keep the cut
        return min(self.from_rate, max(floor, measured)), error
