"""``AdaptiveLimiter``: the parts put together, and the phases of the rate (see the package's
docstring for the whole)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any, Literal

from rekbatch.calls.limiter.background import BackgroundDetector
from rekbatch.calls.limiter.pacer import Pacer
from rekbatch.calls.limiter.permit import Outcome, Permit
from rekbatch.calls.limiter.probing import Prober
from rekbatch.calls.limiter.quota import CutWindow, RefusalMeter, overflowed
from rekbatch.calls.limiter.recovery import GoodRate
from rekbatch.calls.limiter.service_bucket import ServiceBucketModel
from rekbatch.calls.limiter.settings import LimiterSettings
from rekbatch.calls.limiter.traffic import Traffic
from rekbatch.clock import MONOTONIC, Clock

Phase = Literal["ceiling", "cut", "hold", "probe", "verify"]


@dataclass(slots=True)
class LimiterCounts:
    successes: int = 0
    throttles: int = 0
    """Refusals, whether or not they counted for the rate."""
    background_throttles: int = 0
    """Refusals within the background share: retried, the rate left alone."""
    errors: int = 0
    cuts: int = 0


class AdaptiveLimiter:
    """Paces one operation's requests at the highest rate the service accepts.

    ``ceiling``: the highest rate ever used, in requests per second (the known quota, or a
    bound on it); ``clock``: the time source (a fake one in tests); ``name`` shows in
    ``snapshot()``; ``settings``: the tunables (``LimiterSettings``).

    Every permit from ``acquire`` (or ``try_acquire``) must be settled once, by
    ``on_success``, ``on_throttle`` or ``on_error`` (later calls are ignored); until then it
    counts as in flight.
    """

    def __init__(
        self,
        ceiling: float,
        *,
        clock: Clock = MONOTONIC,
        name: str = "",
        settings: LimiterSettings | None = None,
    ) -> None:
        if ceiling <= 0:
            raise ValueError("ceiling must be positive")
        self.name = name
        self.settings = settings = settings or LimiterSettings()
        self._clock = clock
        self._ceiling = float(ceiling)
        self._min_rate = min(settings.min_rate, self._ceiling)
        now = clock.now()
        self._pacer = Pacer(self._ceiling, settings, now)
        self._traffic = Traffic(settings)
        self._bucket = ServiceBucketModel(settings, now)
        self._refusals = RefusalMeter(settings)
        self._prober = Prober(settings)
        self._good = GoodRate(settings, now)
        self._background = BackgroundDetector(settings, now)
        self.counts = LimiterCounts()
        # Waiting for a turn: one waiter at a time, first come first served.
        self._turn = asyncio.Lock()
        self._released: asyncio.Future[None] | None = None
        # The phase of the rate.
        self._phase: Phase = "ceiling"
        self._phase_at = now
        self._epoch = 0
        self._steady_since = now  # the rate has held since
        self._blind_rate = self._ceiling  # the rate in phase "cut"
        self._cut: CutWindow | None = None
        self._strike_at = math.inf  # a first refusal under the quota, in "hold"
        # How well the quota in use (``self._bucket.quota``) is known.
        self._error = 0.0
        self._calibrated = False

    # -- reading (no side effects) -----------------------------------------------------------

    @property
    def ceiling(self) -> float:
        return self._ceiling

    @property
    def rate(self) -> float:
        """The rate set now, in requests per second."""
        return self._setpoint(self._clock.now())

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def quota_estimate(self) -> float | None:
        """The service's rate as last measured; None while it has not refused."""
        return self._bucket.quota

    @property
    def background_share(self) -> float:
        """The share of requests the service refuses whatever the rate, as learned."""
        return self._background.share

    @property
    def in_flight(self) -> int:
        return self._pacer.in_flight

    @property
    def latency(self) -> float:
        """Average round trip of accepted requests, in seconds."""
        return self._traffic.latency

    @property
    def max_in_flight(self) -> int:
        settings = self.settings
        need = self.rate * self._traffic.latency * settings.concurrency_margin
        return max(settings.min_concurrency, math.ceil(need))

    @property
    def epoch(self) -> int:
        return self._epoch

    def ready_in(self) -> float:
        """Seconds until a permit could be granted (0: now; infinite while the in-flight
        bound is reached), without waiting for it. Approximate while others wait."""
        return self._pacer.ready_in(self._clock.now(), self._traffic.latency)

    def snapshot(self) -> dict[str, Any]:
        """The limiter's state and counters, for logs, progress and the run summary."""
        quota = self._bucket.quota
        counts = self.counts
        return {
            "name": self.name,
            "rate": round(self.rate, 3),
            "ceiling": self._ceiling,
            "quota_estimate": None if quota is None else round(quota, 3),
            "phase": self._phase,
            "in_flight": self._pacer.in_flight,
            "max_in_flight": self.max_in_flight,
            "latency_ms": round(self._traffic.latency * 1000, 1),
            "successes": counts.successes,
            "throttles": counts.throttles,
            "errors": counts.errors,
            "cuts": counts.cuts,
            "probes": self._prober.probes,
            "probes_passed": self._prober.passed,
            "background_share": round(self._background.share, 4),
            "background_throttles": counts.background_throttles,
        }

    def _setpoint(self, now: float) -> float:
        """The rate at ``now``, from the phase (pure)."""
        trial = self._background.trial
        if trial is not None:
            # A cut under trial holds its level until the answers there decide.
            return trial.level_rate
        quota = self._bucket.quota
        if self._phase == "cut":
            rate = self._blind_rate
        elif self._phase == "ceiling" or quota is None:
            rate = self._ceiling
        elif self._phase == "probe":
            banked = self._bucket.tokens(now)
            good = self._good.rate
            ceiling = self._ceiling
            rate = self._prober.rate(now, quota, banked, good, self._calibrated, ceiling)
        else:
            rate = quota * (1.0 - self.settings.margin)
        return min(self._ceiling, max(self._min_rate, rate))

    # -- permits ---------------------------------------------------------------------------

    async def acquire(self) -> Permit:
        """Wait for this request's turn (first come, first served, paced) and count it in
        flight."""
        async with self._turn:
            while True:
                now = self._clock.now()
                self._advance(now)
                wait = self._pacer.ready_in(now, self._traffic.latency)
                if wait == 0.0:
                    return self._grant(now)
                if math.isinf(wait):
                    await self._wait_release()
                else:
                    await self._clock.sleep(wait)

    def try_acquire(self) -> Permit | None:
        """A permit now if one can go at once and nobody is waiting; else None."""
        if self._turn.locked():
            return None
        now = self._clock.now()
        self._advance(now)
        if self._pacer.ready_in(now, self._traffic.latency) > 0.0:
            return None
        return self._grant(now)

    async def _wait_release(self) -> None:
        if self._released is None or self._released.done():
            self._released = asyncio.get_running_loop().create_future()
        await self._released

    def _grant(self, now: float) -> Permit:
        rate = self._pacer.rate
        self._pacer.take(now)
        permit = Permit(now, self._epoch, rate)
        if self._phase != "cut":
            before = self._bucket.book(now)
            if before is not None:
                permit.booked = True
                permit.probe = before < 1.0 and self._phase == "probe"
        if permit.probe:
            self._prober.sent(permit)
            if self._bucket.tokens(now) <= 1.0 - self._probe_depth(now):
                self._set_phase("verify", now)  # enough past the empty point: wait and see
        self._traffic.on_send(permit)
        self._refusals.on_send(permit)
        return permit

    def _settle(self, permit: Permit, outcome: Outcome, now: float) -> bool:
        if permit.outcome is not None:
            return False
        permit.outcome = outcome
        permit.settled_at = now
        if outcome == "throttle":
            permit.refused = True
        self._pacer.release()
        if self._released is not None and not self._released.done():
            self._released.set_result(None)
        self._traffic.on_answer(permit, now)
        self._refusals.on_answer(permit)
        if self._cut is not None:
            self._cut.on_answer(permit)
        return True

    def on_success(self, permit: Permit) -> None:
        now = self._clock.now()
        if not self._settle(permit, "ok", now):
            return
        self.counts.successes += 1
        self._probe_answered(permit, now)
        self._progress(now)

    def on_throttle(self, permit: Permit) -> None:
        now = self._clock.now()
        if not self._settle(permit, "throttle", now):
            return
        self.counts.throttles += 1
        self._bucket.hand_back(permit)
        cut_before = self.counts.cuts > 0
        if not self._background.counts_for_rate(self._traffic, now, cut_before=cut_before):
            # Not about the rate: the caller retries it with backoff; the rate stays.
            permit.outcome = "error"
            self.counts.background_throttles += 1
            self._probe_answered(permit, now)
        else:
            self._refused_for_rate(permit, now)
        self._progress(now)

    def on_error(self, permit: Permit) -> None:
        """A failure that says nothing about the rate: the permit is released."""
        now = self._clock.now()
        if not self._settle(permit, "error", now):
            return
        self.counts.errors += 1
        self._bucket.hand_back(permit)
        self._probe_answered(permit, now)
        self._progress(now)

    def _probe_answered(self, permit: Permit, now: float) -> None:
        """An answer to a probe's request that was not a refusal for the rate: if it was
        the last one out, and the service accepted some past the empty point, the probe
        passed."""
        if permit.probe and self._phase == "verify" and self._prober.passed_with(permit):
            self._probe_passed(now)

    # -- what a refusal means, by phase ----------------------------------------------------

    def _refused_for_rate(self, permit: Permit, now: float) -> None:
        settings = self.settings
        quota = self._bucket.quota
        latency = self._traffic.latency
        current = permit.epoch == self._epoch
        if self._good.fallback is not None and permit.sent_at >= self._good.jumped_at:
            self._jump_failed(permit, now)
        elif self._phase == "cut":
            cut = self._cut
            assert cut is not None
            if current and permit.sent_at >= cut.end + self._echo():
                self._cut_down(permit, now)  # still refused at the cut rate
        elif self._phase in ("probe", "verify") and permit.sent_at >= self._prober.started_at:
            self._resync(permit, now)
            self._probe_failed(now)
        elif quota is None:
            if current:
                self._cut_down(permit, now)
        elif self._phase == "hold" and permit.sent_at >= self._phase_at + latency:
            # Refused under the quota: once may be jitter or the model's error; twice in a
            # row means the quota went down.
            first = self._strike_at
            window = max(settings.strike, settings.strike_requests / max(quota, self._min_rate))
            if current and first < permit.sent_at < first + window:
                self._cut_down(permit, now)
            else:
                self._strike_at = permit.sent_at
                self._resync(permit, now)
        else:
            self._resync(permit, now)

    def _echo(self) -> float:
        """Seconds after a cut during which refusals are still the old rate's echo."""
        settings = self.settings
        return min(settings.cut_echo, settings.cut_echo_trips * self._traffic.latency)

    def _resync(self, permit: Permit, now: float) -> None:
        """``permit`` was refused for the rate: the service's bucket was empty when it
        arrived. Re-sync the model there, and measure the quota from the previous one."""
        if self._bucket.quota is None:
            return
        after = self._traffic.permits_after(permit.sent_at)
        spent = 0
        for other in after:
            if other.outcome != "throttle":
                spent += 1
                other.booked = True  # counted as spent: handed back if refused after all
        newer = self._refusals.on_refusal(permit.sent_at, after)
        self._bucket.resync(permit.sent_at, spent, now, newer=newer)

    # -- the passing of time and answers ---------------------------------------------------

    def _advance(self, now: float) -> None:
        """Transitions that come with time: a jump that held, a hold that ends in a probe,
        a measuring probe that held at its limit. Then the pacer follows the rate."""
        if self._good.jump_held(now, self._traffic.latency):
            self._calibrated = self._good.calibrated
        quota = self._bucket.quota
        if quota is not None and self._phase == "hold":
            good = self._good.recall(now, quota, now - self._steady_since)
            if now - self._phase_at >= self._prober.hold_time(quota, good, self._calibrated):
                self._set_phase("probe", now)
        if quota is not None and self._phase == "probe":
            banked = self._bucket.tokens(now)
            good = self._good.rate
            if self._prober.advance(now, quota, banked, good, self._calibrated, self._ceiling):
                self._held_at_limit(now)
        self._pacer.set_rate(self._setpoint(now), now)

    def _progress(self, now: float) -> None:
        """Finish what waited on answers: a trial's verdict, the background's tracking, a
        cut's measure, a measure between two refusals."""
        background = self._background
        if background.trial is not None:
            verdict = background.judge(self._traffic, now)
            if verdict.kind == "background":
                self._undo_cut(verdict.rate, now)
            elif verdict.kind == "next_level":
                self._new_epoch(now)
            elif verdict.kind == "quota":
                self._quota_measured(verdict.rate, now)
            elif verdict.kind == "release":
                self._quota_above_level(verdict.rate, now)
        background.track(self._traffic, now)
        cut = self._cut
        ready = cut is not None and cut.ready(now, self._traffic.latency, self.settings)
        if self._phase == "cut" and cut is not None and ready:
            self._quota_from_cut(cut, now)
        measured = self._refusals.measured()
        quota = self._bucket.quota
        if measured is not None and quota is not None and self._phase != "cut":
            start, end, window = measured
            accepted = sum(1 for p in window if p.outcome == "ok")
            rate = accepted / (end - start)
            capacity = self._bucket.capacity(rate)
            if not overflowed(start, end, window, rate, capacity, self.settings):
                self._set_quota(rate, now)
                self._error = 1.0 / (end - start)  # a request at each end
                self._calibrated = True
            elif rate > quota:
                self._set_quota(rate, now)  # the bucket may have overflowed: a lower bound

    # -- transitions -----------------------------------------------------------------------

    def _set_phase(self, phase: Phase, now: float) -> None:
        if phase == "probe" and self._phase != "probe":
            self._prober.start(now)
        if phase == "hold":
            self._strike_at = math.inf
        self._phase = phase
        self._phase_at = now
        self._background.rate_changed(now)

    def _set_quota(self, quota: float | None, now: float) -> None:
        if quota is not None:
            quota = min(self._ceiling, max(self._min_rate, quota))
        self._bucket.set_quota(quota, now)

    def _new_epoch(self, now: float) -> None:
        """The rate changed: replies to earlier requests do not cut it again, and nothing
        banked at the old rate goes out in a burst."""
        self._epoch += 1
        self._pacer.set_rate(self._setpoint(now), now, fresh=True)
        self._background.rate_changed(now)

    def _probe_depth(self, now: float) -> float:
        bucket = self._bucket
        return self._prober.depth(
            now,
            bucket.capacity(),
            self._calibrated,
            bucket.synced,
            self._refusals.anchor,
            self._error,
        )

    def _cut_down(self, permit: Permit, now: float) -> None:
        """A refusal the limiter did not expect: the quota went down. Cut blind, and
        measure over the next round trip."""
        settings = self.settings
        self.counts.cuts += 1
        self._good.end_jump()
        current = self._setpoint(now)
        cut = self._cut
        first = self._phase != "cut" or cut is None
        if cut is not None and not first:
            # Still refused: halve again, or lower to what the service accepted meanwhile.
            blind = self._blind_rate * settings.blind_cut
            until = now - self._traffic.latency
            if until - cut.start >= settings.cut_measure_span:
                between = self._traffic.permits_between(cut.start, until)
                accepted = sum(1 for p in between if p.outcome == "ok")
                measured = accepted / (until - cut.start)
                blind = min(blind, max(measured, blind * settings.blind_cut))
            self._blind_rate = max(self._min_rate, blind)
            cut.extend(now, self._traffic.permits_between(cut.start, now))
        else:
            self._remember_good(permit.sent_at, now)
            sent = min(current, permit.rate)
            sending = self._traffic.sent_rate(now, settings.send_rate_window)
            if sending > 0:
                sent = min(sent, sending)
            self._blind_rate = max(self._min_rate, sent * settings.blind_cut)
            sent_since = self._traffic.permits_between(permit.sent_at, now)
            self._cut = CutWindow(permit.sent_at, now, permit.rate, sent_since)
            self._set_phase("cut", now)
            self._refusals.clear()
        self._calibrated = False
        self._prober.shorten()
        self._new_epoch(now)
        if first:
            level = self._setpoint(now)
            self._background.open_trial(
                self._traffic, now, before=current, level_rate=level, refused_at=permit.sent_at
            )

    def _remember_good(self, refused_at: float, now: float) -> None:
        """Before a drop: keep the rate the service took until then, to go back to when the
        drop ends: the measured quota if it was, else what the requests accepted over the
        last ``good_window`` seconds prove (with a bucket ``server_burst`` deep, a quota of
        at least taken / (seconds + server_burst))."""
        settings = self.settings
        start = max(self._steady_since, refused_at - settings.good_window)
        span = refused_at - start
        if span < settings.server_burst:
            return
        quota = self._bucket.quota
        if quota is not None and self._calibrated:
            good = quota  # measured, and held since
        else:
            # Taken: not refused for the rate (a refusal within the background, or a
            # failure, spent a token all the same).
            between = self._traffic.permits_between(start, refused_at)
            taken = sum(1 for p in between if p.outcome != "throttle")
            at_ceiling = taken / span >= (1.0 - settings.margin) * self._ceiling
            if at_ceiling and span >= settings.ceiling_proof:
                good = self._ceiling  # held at the ceiling: the ceiling it is
            else:
                good = taken / (span + settings.server_burst)
        calibrated = good >= self._ceiling or self._calibrated
        self._good.remember(good, self._error, calibrated, now)

    def _quota_from_cut(self, cut: CutWindow, now: float) -> None:
        """Everything sent while the service refused has answered: measure the quota."""
        settings = self.settings
        background = self._background
        floor = 0.0
        if background.share > 0 or background.trial is not None:
            # Refusals that are not about the rate among the quota's: a refusal no longer
            # means an empty bucket, and the measure between refusals runs short. The
            # service took at least what it accepted since the first refusal.
            since = self._traffic.window(cut.start, now)
            floor = settings.cut_floor * since.ok_rate
        quota, error = cut.measure(
            self._blind_rate, floor, self._echo(), background.within, settings
        )
        refused = cut.refused()
        self._cut = None
        self._set_quota(quota, now)
        self._error = error
        self._bucket.empty(now)
        self._set_phase("hold", now)
        if refused:
            self._resync(max(refused, key=lambda p: p.sent_at), now)
        self._steady_since = now
        self._good.forget_below(self._bucket.quota or quota)
        self._new_epoch(now)

    def _quota_above_level(self, rate: float, now: float) -> None:
        """A trial found the refusals stopped at its level (sent at ``rate``): the quota
        lies between that and the rate before the cut, if the refusals were the quota's at
        all (more than the background's by chance, they may not have been). Measure it at
        once: a probe from ``rate`` up."""
        self._cut = None
        self._set_quota(max(rate, self._bucket.quota or 0.0), now)
        self._calibrated = False
        self._bucket.empty(now)
        self._refusals.clear()
        self._set_phase("hold", now)
        self._set_phase("probe", now)
        self._steady_since = now
        self._new_epoch(now)

    def _quota_measured(self, accepted: float, now: float) -> None:
        """A trial found the quota: the accepted rate at a level held while refused (the
        service's bucket was empty throughout)."""
        self._cut = None
        self._set_quota(accepted, now)
        self._error = self.settings.cut_error * accepted
        self._bucket.empty(now)
        self._refusals.clear()
        self._set_phase("hold", now)
        self._steady_since = now
        self._new_epoch(now)

    def _undo_cut(self, before: float, now: float) -> None:
        """A trial found the refusals were not about the rate: back to the rate ``before``
        the cut, or the highest sent lately if higher (the cuts just before it were about
        the same refusals)."""
        settings = self.settings
        horizon = now - settings.undo_horizon
        rate = max([before, *(p.rate for p in self._traffic.permits_after(horizon))])
        self._cut = None
        self._good.end_jump()
        self._good.forget()
        self._refusals.clear()
        self._calibrated = False
        if rate >= self._ceiling * (1.0 - settings.same_rate_margins * settings.margin):
            self._set_quota(None, now)
            self._set_phase("ceiling", now)
        else:
            self._set_quota(rate / (1.0 - settings.margin), now)
            self._bucket.empty(now)
            self._set_phase("hold", now)
        self._steady_since = now
        self._new_epoch(now)

    def _probe_passed(self, now: float) -> None:
        """The service took more than the quota allows. Below a rate it took before a
        drop: straight back to it (undone by the first refusal). Else measure how much."""
        quota = self._bucket.quota
        assert quota is not None
        self._prober.succeeded()
        self._calibrated = False
        self._refusals.clear()
        good = self._good.rate
        if good is not None and quota < good:
            self._good.jump(quota, now)
            self._steady_since = now
            if good >= self._ceiling:
                self._set_quota(None, now)
                self._set_phase("ceiling", now)
            else:
                self._set_quota(good, now)
                self._error = self._good.error
                self._bucket.synced = False
                self._set_phase("hold", now)
        else:
            self._set_phase("hold", now)
            self._set_phase("probe", now)  # a new probe, which measures
        self._new_epoch(now)

    def _probe_failed(self, now: float) -> None:
        """Refused above the quota: it holds."""
        quota = self._bucket.quota
        good = self._good.rate
        lengthen = self._calibrated and (good is None or quota is None or quota >= good)
        self._prober.failed(lengthen)
        self._set_phase("hold", now)

    def _held_at_limit(self, now: float) -> None:
        """A measuring probe held at its limit: the service takes it, as far as a second
        can tell (a full bucket hides a lower quota for longer). So it is a jump, undone by
        the first refusal within ``jump_seconds``: to the rate remembered from before a drop
        (the limit is just under it), or to the ceiling."""
        quota = self._bucket.quota
        assert quota is not None
        good = self._good.rate
        limit = self._prober.limit(quota, good, self._ceiling)
        self._prober.count_pass()
        self._steady_since = now
        self._good.jump(quota, now)
        if good is not None and limit < self._ceiling:
            self._set_quota(good, now)
            self._error = self._good.error
            self._bucket.synced = False
            self._set_phase("hold", now)
        else:
            self._good.forget()
            self._set_quota(None, now)
            self._set_phase("ceiling", now)
        self._new_epoch(now)

    def _jump_failed(self, permit: Permit, now: float) -> None:
        """Refused after going back to the remembered rate: the other job is still there."""
        fallback = self._good.fallback
        self._good.end_jump()
        self._set_quota(fallback, now)
        self._bucket.empty(now)
        self._resync(permit, now)
        self._set_phase("hold", now)
        self._new_epoch(now)
