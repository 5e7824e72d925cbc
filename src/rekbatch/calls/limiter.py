"""An adaptive client-side rate limiter: one per Rekognition operation, shared by all consumers.

Rekognition quotas are per operation, per Region, per account, enforced by a token bucket
(about one second of burst). Past the quota the service answers
``ProvisionedThroughputExceededException``/``ThrottlingException``. The limiter keeps a run at
the available quota with almost no throttled calls, whether the quota is known (the ceiling),
unknown (the ceiling is only an upper bound) or shared with another job that comes and goes.

Usage, around one request (each retry attempt is a new request, with its own permit)::

    async with limiter.request():                # waits for its turn (FIFO, paced)
        response = await backend.call(...)       # BackendError(kind="throttle") -> on_throttle

or by hand::

    permit = await limiter.acquire()
    try:
        response = await backend.call(...)
    except BackendError as exc:
        if exc.kind == "throttle":
            limiter.on_throttle(permit)
        else:
            limiter.on_error(permit)
        raise
    except BaseException:
        limiter.on_error(permit)
        raise
    else:
        limiter.on_success(permit)

Every permit must be settled once (later calls are ignored); until then it counts as in flight.

How it works:

- Pacing: a token bucket at the current rate with a small burst (``burst`` seconds of rate, at
  least one token). Waiters are served one at a time, first come first served, each at the
  next token, so a big pool of consumers never stampedes.
- In flight: at most ``rate * latency * concurrency_margin`` requests (Little's law, with the
  average observed round trip; at least ``min_concurrency``).
- It starts at the ceiling, never exceeds it, and stays there while the service never refuses.
- Once it has an estimate of the service's rate (the *quota*) it keeps a model of the
  service's token bucket (``server_burst`` seconds deep, like Rekognition's): each request
  sent is booked, each refusal handed back; a refusal re-syncs it (the bucket was empty then).
- It runs at ``quota * (1 - margin)``, which lets the service's bucket bank a little.
- A refusal it did not provoke means the quota went down (another job started): it cuts at
  once to ``blind_cut`` of the rate, at most once per round trip (replies to requests sent
  before the cut took effect, an older epoch, do not cut again). A round trip later, the
  requests sent while the service refused have answered: what it accepted between two
  refusals *is* the new quota (refilled from empty to empty). Under the estimate, a single
  refusal is taken for jitter; a second one within ``strike`` seconds is a drop.
- Probes, to find out whether more is available: every ``hold`` seconds (doubling to
  ``max_hold`` while they fail), or every ``recover_hold`` seconds while below a rate the
  service took before a drop (``memory`` seconds), it spends what the model says is banked,
  then crawls ``probe_crawl`` (``recover_crawl``) above the quota, ``probe_depth`` requests
  (plus the model's possible error) past the point where the service's bucket should be
  empty, and waits for the answers. A refusal ends the probe, usually with one throttled
  request, and measures the quota exactly: requests accepted since the previous refusal,
  divided by the time between them. If all pass: back to the earlier good rate at once
  (undone by the first refusal if the other job is still there), or, with none, a measuring
  probe that speeds up (doubling every ``probe_double`` seconds) until the service refuses.
- Throttles that are not the quota: a service under load (or noisy neighbours) refuses a
  steady share of requests whatever the rate, where the quota refuses more the faster one
  sends and nothing below it. After a cut, while the limiter keeps finding refusals and
  cutting further, the answers at the first lower rate are compared with those once the rate
  is a third of it: refused at the same share, with the accepted rate fallen in proportion,
  the refusals were not about the rate. The cuts are undone, that share is remembered as the
  background, and from then on a refusal counts for the rate only when the recent refused
  share rises clearly above the background (``background_margin`` plus three standard
  errors). Refusals within it are retried with backoff by the caller and leave the rate
  alone; the background is followed down as the refusals fade. Without background refusals
  nothing of the above changes what the limiter does.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from rekbatch.clock import MONOTONIC, Clock
from rekbatch.errors import BackendError

_EPS = 1e-9
Outcome = Literal["ok", "throttle", "error"]
Phase = Literal["ceiling", "measure", "hold", "probe", "pause"]


@dataclass(eq=False, slots=True)
class Permit:
    """One request's leave to go, and what the limiter learns from its outcome."""

    sent_at: float
    epoch: int
    """Rate epoch at send time: replies from an older epoch never cut the rate again."""
    rate: float
    """The limiter's rate when the request was sent."""
    booked: bool
    """The model counted it as spending one of the service's tokens."""
    probe: bool = False
    """Sent past the point where the model says the service's bucket is empty."""
    outcome: Outcome | None = None
    settled_at: float | None = None
    refused: bool = False
    """Throttled, whether or not it counted for the rate (the background share is computed
    from these; ``outcome`` is "error" for a throttle within the background)."""


class AdaptiveLimiter:
    """Paces one operation's requests at the highest rate the service accepts.

    ``ceiling`` is the highest rate ever used, in requests per second (the known quota, or a
    bound on it); ``clock`` the time source (``FakeClock``/``VirtualClock`` in tests); ``name``
    shows in ``snapshot()``. The rest are tunables whose defaults suit Rekognition (tuned on a
    simulated token bucket with one second of burst and 150 ms median latency):

    - ``min_rate``: floor of the rate (requests per second).
    - ``burst``: depth of the client's own pacing bucket, in seconds of rate (at least 1).
    - ``margin``: runs this fraction under the measured quota.
    - ``blind_cut``: factor of the first cut after an unexpected refusal.
    - ``hold``/``max_hold``: seconds between probes above a measured quota (doubling while
      they fail); ``recover_hold``: between probes back towards an earlier good rate, which is
      remembered for ``memory`` seconds.
    - ``probe_fast``: how much faster a probe spends what the model says is banked;
      ``probe_crawl``/``recover_crawl``/``min_crawl``: how much above the quota it then goes
      (fraction, fraction while recovering, floor in requests per second); ``probe_double``:
      how fast a measuring probe speeds up; ``probe_depth``: requests past the model's empty
      point (plus its error) before a probe passes; ``tolerance``: banked requests under which
      the fast phase ends.
    - ``strike``: seconds within which a second refusal under the estimate means a drop.
    - ``server_burst``: the service's bucket depth, in seconds of quota.
    - ``concurrency_margin``/``min_concurrency``: the in-flight bound; ``initial_latency``:
      the round trip assumed before the first answer.
    - ``background_window``: seconds of requests the refused share is measured over;
      ``background_margin``: how far above the background share (plus three standard
      errors) refusals count for the rate; ``test_requests``: the least answers a share is
      measured from.
    """

    def __init__(
        self,
        ceiling: float,
        *,
        clock: Clock = MONOTONIC,
        name: str = "",
        min_rate: float = 0.2,
        burst: float = 0.05,
        margin: float = 0.03,
        blind_cut: float = 0.5,
        hold: float = 15.0,
        max_hold: float = 60.0,
        recover_hold: float = 3.0,
        probe_fast: float = 0.5,
        probe_crawl: float = 0.1,
        recover_crawl: float = 0.25,
        min_crawl: float = 2.0,
        probe_double: float = 0.5,
        probe_depth: float = 2.0,
        tolerance: float = 1.0,
        strike: float = 2.0,
        server_burst: float = 1.0,
        memory: float = 120.0,
        concurrency_margin: float = 2.0,
        min_concurrency: int = 4,
        initial_latency: float = 1.0,
        background_window: float = 2.0,
        background_margin: float = 0.02,
        test_requests: int = 20,
    ) -> None:
        if ceiling <= 0:
            raise ValueError("ceiling must be positive")
        self.name = name
        self._clock = clock
        self._ceiling = float(ceiling)
        self.min_rate = min(min_rate, self._ceiling)
        self.burst = burst
        self.margin = margin
        self.blind_cut = blind_cut
        self.hold = hold
        self.max_hold = max_hold
        self.recover_hold = recover_hold
        self.probe_fast = probe_fast
        self.probe_crawl = probe_crawl
        self.recover_crawl = recover_crawl
        self.min_crawl = min_crawl
        self.probe_double = probe_double
        self.probe_depth = probe_depth
        self.tolerance = tolerance
        self.strike = strike
        self.server_burst = server_burst
        self.memory = memory
        self.concurrency_margin = concurrency_margin
        self.min_concurrency = min_concurrency
        self.background_window = background_window
        self.background_margin = background_margin
        self.test_requests = test_requests

        now = clock.now()
        # Pacing.
        self._queue = asyncio.Lock()
        self._release: asyncio.Future[None] | None = None
        self._tokens = max(1.0, self._ceiling * burst)
        self._tokens_at = now
        self._in_flight = 0
        self._latency = initial_latency
        # Rate state.
        self._epoch = 0
        self._phase: Phase = "ceiling"
        self._phase_at = now
        self._quota: float | None = None
        self._blind_rate = self._ceiling
        self._good: float | None = None  # a higher rate the service took before a drop
        self._good_at = now
        self._stable_since = now
        self._slow_hold = hold
        self._calibrated = False
        self._quota_err = 0.0
        self._fallback: float | None = None  # the estimate before a jump to the good rate
        self._good_err = 0.0
        self._good_calibrated = False
        self._jump_at = now
        self._hold_refused = math.inf
        self._probe_at = now
        self._crawl_at: float | None = None
        self._limit_at: float | None = None
        self._probe_sends: list[Permit] = []
        # Model of the service's bucket.
        self._bank = 0.0
        self._bank_at = now
        self._basis = now  # the model counts requests sent after this
        # The last refusal (service's bucket empty), and what was sent since.
        self._anchor: float | None = None
        self._since_anchor: list[Permit] = []
        self._synced = False
        self._measuring: tuple[float, float, list[Permit]] | None = None
        # A drop being measured: requests sent from ``_drop_start`` to ``_drop_end``.
        self._drop_start = 0.0
        self._drop_end = 0.0
        self._drop_from = 0.0
        self._recent: deque[Permit] = deque()
        # Counters.
        self.successes = 0
        self.throttles = 0
        self.errors = 0
        self.cuts = 0
        self.probes = 0
        self.probes_passed = 0
        self.background_throttles = 0
        # Refusals that are not about the rate.
        self._tally = _Tally()
        self._background = 0.0
        self._background_at = now
        self._drop: _Drop | None = None
        self._started_at = now

    # -- observability ---------------------------------------------------------------------

    @property
    def ceiling(self) -> float:
        return self._ceiling

    @property
    def rate(self) -> float:
        """The current rate setpoint, in requests per second."""
        return self._rate(self._clock.now())

    @property
    def quota_estimate(self) -> float | None:
        """The service's rate as last measured; None while it never refused."""
        return self._quota

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def latency(self) -> float:
        """Average round trip of accepted requests, in seconds."""
        return self._latency

    @property
    def max_in_flight(self) -> int:
        need = self._rate(self._clock.now()) * self._latency * self.concurrency_margin
        return max(self.min_concurrency, math.ceil(need))

    @property
    def epoch(self) -> int:
        return self._epoch

    def snapshot(self) -> dict[str, Any]:
        """The limiter's state and counters, for logs and the run summary."""
        now = self._clock.now()
        return {
            "name": self.name,
            "rate": round(self._rate(now), 3),
            "ceiling": self._ceiling,
            "quota_estimate": None if self._quota is None else round(self._quota, 3),
            "phase": self._phase,
            "in_flight": self._in_flight,
            "max_in_flight": self.max_in_flight,
            "latency_ms": round(self._latency * 1000, 1),
            "successes": self.successes,
            "throttles": self.throttles,
            "errors": self.errors,
            "cuts": self.cuts,
            "probes": self.probes,
            "probes_passed": self.probes_passed,
            "background_share": round(self._background, 4),
            "background_throttles": self.background_throttles,
        }

    # -- the request side ------------------------------------------------------------------

    async def acquire(self) -> Permit:
        """Wait for this request's turn and count it in flight."""
        async with self._queue:
            while True:
                now = self._clock.now()
                rate = self._rate(now)
                self._refill(now, rate)
                if self._in_flight >= self.max_in_flight:
                    await self._wait_release()
                    continue
                if self._tokens >= 1.0 - _EPS:
                    break
                await self._clock.sleep(max(_EPS, (1.0 - self._tokens) / rate))
            self._tokens -= 1.0
            self._in_flight += 1
            return self._send(now, rate)

    @asynccontextmanager
    async def request(self) -> AsyncIterator[Permit]:
        """``acquire``, then settle the permit from how the block ends: normally is success,
        ``BackendError`` of kind ``throttle`` a throttle, any other exception an error."""
        permit = await self.acquire()
        try:
            yield permit
        except BackendError as exc:
            if exc.kind == "throttle":
                self.on_throttle(permit)
            else:
                self.on_error(permit)
            raise
        except BaseException:
            self.on_error(permit)
            raise
        else:
            self.on_success(permit)

    @property
    def background_share(self) -> float:
        """The share of requests the service refuses whatever the rate, as learned."""
        return self._background

    def on_success(self, permit: Permit) -> None:
        now = self._clock.now()
        if not self._settle(permit, "ok", now):
            return
        self._tally.add(permit, ok=True, refused=False)
        self.successes += 1
        if self.successes == 1:
            self._latency = now - permit.sent_at
        self._latency += 0.1 * ((now - permit.sent_at) - self._latency)
        if (
            permit.probe
            and self._phase == "pause"
            and permit in self._probe_sends
            and all(p.outcome == "ok" for p in self._probe_sends)
        ):
            self._probe_passed(now)
        self._progress(now)

    def on_throttle(self, permit: Permit) -> None:
        now = self._clock.now()
        if not self._settle(permit, "throttle", now):
            return
        permit.refused = True
        self._tally.add(permit, ok=False, refused=True)
        self.throttles += 1
        if self._within_background(now):
            # Not about the rate: the caller retries it with backoff; the rate stays.
            permit.outcome = "error"
            self.background_throttles += 1
            self._unbook(permit)
            self._progress(now)
            return
        self._unbook(permit)
        if self._fallback is not None and permit.sent_at >= self._jump_at:
            self._jump_failed(permit, now)
        elif self._phase == "measure":
            # Requests sent just after a cut can still meet the echo of those sent before.
            late = permit.sent_at >= self._drop_end + min(0.25, 0.5 * self._latency)
            if permit.epoch == self._epoch and late:
                self._cut(permit, now)
        elif self._phase in ("probe", "pause") and permit.sent_at >= self._probe_at:
            self._refused(permit, now)
            self._probe_failed(now)
        elif self._quota is None:
            if permit.epoch == self._epoch:
                self._cut(permit, now)
        elif self._phase == "hold" and permit.sent_at >= self._phase_at + self._latency:
            # Refused though sent under the estimate: once may be jitter or the model's
            # error, twice in a row means the quota went down.
            first = self._hold_refused
            window = max(self.strike, 10.0 / max(self._quota, self.min_rate))
            if permit.epoch == self._epoch and first < permit.sent_at < first + window:
                self._cut(permit, now)
            else:
                self._hold_refused = permit.sent_at
                self._refused(permit, now)
        else:
            self._refused(permit, now)
        self._progress(now)

    def on_error(self, permit: Permit) -> None:
        """A failure that says nothing about the rate: just release the permit."""
        now = self._clock.now()
        if not self._settle(permit, "error", now):
            return
        self._tally.add(permit, ok=False, refused=False)
        self.errors += 1
        self._unbook(permit)
        if permit.probe and self._phase == "pause":
            self._set_phase("hold", now)
        self._progress(now)

    # -- internals: pacing -----------------------------------------------------------------

    def _unbook(self, permit: Permit) -> None:
        """The model counted a token that the service did not spend: hand it back."""
        if permit.booked and self._quota is not None and permit.sent_at > self._basis:
            self._bank += 1.0

    def _refill(self, now: float, rate: float) -> None:
        cap = max(1.0, rate * self.burst)
        self._tokens = min(cap, self._tokens + max(0.0, now - self._tokens_at) * rate)
        self._tokens_at = now

    async def _wait_release(self) -> None:
        if self._release is None or self._release.done():
            self._release = asyncio.get_running_loop().create_future()
        await self._release

    def _settle(self, permit: Permit, outcome: Outcome, now: float) -> bool:
        if permit.outcome is not None:
            return False
        permit.outcome = outcome
        permit.settled_at = now
        self._in_flight -= 1
        if self._release is not None and not self._release.done():
            self._release.set_result(None)
        return True

    def _send(self, now: float, rate: float) -> Permit:
        booked, probe = self._model_send(now)
        permit = Permit(now, self._epoch, rate, booked=booked, probe=probe)
        if probe:
            self._probe_sends.append(permit)
            if self._bank <= 1.0 - self._depth(now):
                self._set_phase("pause", now)
        self._recent.append(permit)
        horizon = now - max(10.0, 20 * self._latency)
        while self._recent and self._recent[0].sent_at < horizon:
            self._recent.popleft()
        if self._anchor is not None:
            self._since_anchor.append(permit)
        return permit

    # -- internals: the rate ---------------------------------------------------------------

    def _rate(self, now: float) -> float:
        if self._fallback is not None and now - self._jump_at > max(1.0, 4 * self._latency):
            self._fallback = None  # the jump back to the good rate held
            self._calibrated = self._good_calibrated
        quota = self._quota
        if self._phase == "measure":
            rate = self._blind_rate
        elif self._phase == "ceiling" or quota is None:
            rate = self._ceiling
        else:
            if self._phase == "hold":
                self._maybe_probe(quota, now)
            if self._phase == "probe":
                rate = self._probe_rate(quota, now)
            else:
                rate = quota * (1.0 - self.margin)
            if self._quota is None:
                rate = self._ceiling
        rate = min(self._ceiling, max(self.min_rate, rate))
        drop = self._drop
        if drop is not None:
            # A drop under judgement holds the rate at its level until the answers there
            # decide (a quota measured from refusals that were not about the rate would be
            # far too low).
            rate = drop.level_rate
        return rate

    def _probe_rate(self, quota: float, now: float) -> float:
        self._bank_update(now)
        if self._bank >= 1.0 + self.tolerance:
            return quota * (1.0 + self.probe_fast)  # spend what the model says is banked
        if self._crawl_at is None:
            self._crawl_at = now
        good = self._good
        if good is not None and good > quota:  # recovering: test for the good rate sooner
            crawl = max(quota * self.recover_crawl, (good - quota) * self.recover_crawl)
        else:
            crawl = quota * self.probe_crawl
        crawl = max(self.min_crawl, crawl)
        if self._calibrated:
            return quota + crawl
        # Measuring: crawl faster and faster until the service refuses.
        rate = quota + crawl * math.pow(2.0, (now - self._crawl_at) / self.probe_double)
        limit = good * (1.0 - self.margin) if good is not None and good > quota else self._ceiling
        if rate < limit:
            self._limit_at = None
            return rate
        if self._limit_at is None:
            self._limit_at = now
        elif now - self._limit_at >= self.server_burst:
            # Sustained at the limit for longer than any bucket could hide: the service
            # takes it.
            self.probes_passed += 1
            self._stable_since = now
            if good is not None and limit < self._ceiling:
                limit = good
            self._good = None
            if limit >= self._ceiling:
                self._quota = None
                self._set_phase("ceiling", now)
            else:
                self._set_quota(limit, now)
                self._set_phase("hold", now)
            self._new_epoch(now)
        return limit

    def _maybe_probe(self, quota: float, now: float) -> None:
        good = self._good
        if good is not None and (
            now - self._good_at > self.memory
            or (quota >= good and now - self._stable_since >= 2 * self.recover_hold)
        ):
            self._good = good = None  # forgotten, or reached and held
        if good is not None and quota < good:
            hold = self.recover_hold
        elif not self._calibrated:
            hold = min(self._slow_hold, 2 * self.recover_hold)
        else:
            hold = self._slow_hold
        if now - self._phase_at >= hold:
            self._set_phase("probe", now)

    def _set_phase(self, phase: Phase, now: float) -> None:
        if phase == "probe" and self._phase != "probe":
            self._probe_at = now
            self._crawl_at = None
            self._limit_at = None
            self._probe_sends = []
            self.probes += 1
        if phase == "hold":
            self._hold_refused = math.inf
        self._phase = phase
        self._phase_at = now

    def _bank_update(self, now: float) -> None:
        quota = self._quota
        if quota is None:
            return
        cap = max(1.0, quota * self.server_burst)
        self._bank = min(cap, self._bank + max(0.0, now - self._bank_at) * quota)
        self._bank_at = now

    def _depth(self, now: float) -> float:
        """How far past the model's empty point a probe goes before it counts as passed:
        beyond what the model's own error could explain."""
        quota = self._quota
        assert quota is not None
        cap = max(1.0, quota * self.server_burst)
        if not self._calibrated:
            return math.inf  # a measuring probe goes on until the service refuses
        if not self._synced or self._anchor is None:
            return self.probe_depth + cap
        return self.probe_depth + min(cap, self._quota_err * (now - self._anchor))

    def _model_send(self, now: float) -> tuple[bool, bool]:
        """Book one request in the model of the service's bucket: (booked, probe)."""
        if self._quota is None or self._phase == "measure":
            return False, False
        self._bank_update(now)
        before = self._bank
        self._bank -= 1.0
        return True, before < 1.0 and self._phase == "probe"

    def _set_quota(self, quota: float, now: float) -> None:
        self._bank_update(now)
        self._quota = min(self._ceiling, max(self.min_rate, quota))

    def _new_epoch(self, now: float) -> None:
        self._epoch += 1
        self._refill(now, self._rate(now))
        self._tokens = min(self._tokens, 1.0)

    def _refused(self, permit: Permit, now: float) -> None:
        """The service's bucket was empty when ``permit`` arrived: re-sync the model there,
        and measure the quota from the requests it accepted since the previous refusal."""
        quota = self._quota
        assert quota is not None
        t = permit.sent_at
        start = self._anchor
        spent = 0
        for p in self._recent:
            if p.sent_at > t and p.outcome != "throttle":
                spent += 1
                p.booked = True  # counted as spent: handed back if it turns out refused
        bound = (now - t) * quota - spent
        self._bank_update(now)
        if start is None or t > start:
            self._bank = min(max(1.0, quota * self.server_burst), 0.5 + bound)
            self._basis = t
        else:
            self._bank = min(self._bank, 1.0 + bound)
        if start is not None and t > start:
            if t - start >= 2.0 and self._measuring is None:
                window = [p for p in self._since_anchor if p.sent_at <= t]
                self._measuring = (start, t, window)
            self._since_anchor = [p for p in self._since_anchor if p.sent_at > t]
        elif start is None:
            self._since_anchor = [p for p in self._recent if p.sent_at > t]
        if start is None or t > start:
            self._anchor = t
        self._synced = True

    def _unanchor(self) -> None:
        self._anchor = None
        self._since_anchor = []
        self._measuring = None

    def _progress(self, now: float) -> None:
        """Finish what waited on answers: a cut's test, a drop's measure, a quota measure."""
        if self._drop is not None:
            self._judge_drop(now)
        if self._background > 0 and now - self._background_at >= self.background_window:
            self._track_background(now)
        if self._phase == "measure":
            self._check_drop(now)
        if self._measuring is not None:
            start, end, window = self._measuring
            if all(p.outcome is not None for p in reversed(window)):
                self._measuring = None
                accepted = sum(1 for p in window if p.outcome == "ok")
                quota = self._quota
                if quota is not None and self._phase != "measure":
                    measured = accepted / (end - start)
                    if not self._overflowed(start, window, measured):
                        self._set_quota(measured, now)
                        self._quota_err = 1.0 / (end - start)  # a token at each end
                        self._calibrated = True
                    elif measured > quota:
                        # The service's bucket may have overflowed: only a lower bound.
                        self._set_quota(measured, now)

    def _overflowed(self, start: float, window: list[Permit], quota: float) -> bool:
        """Would a bucket refilled at ``quota`` have overflowed between ``start`` (empty) and
        the end of ``window``? If so, requests accepted in between only bound the quota."""
        cap = max(1.0, quota * self.server_burst)
        tokens, at = 0.5, start
        for p in window:
            tokens += (p.sent_at - at) * quota
            at = p.sent_at
            if tokens + 0.5 >= cap:
                return True
            if p.outcome == "ok":
                tokens -= 1.0
        return False

    def _probe_failed(self, now: float) -> None:
        """The service refused past the estimate: the estimate holds."""
        if self._calibrated and (
            self._good is None or self._quota is None or self._quota >= self._good
        ):
            self._slow_hold = min(self.max_hold, self._slow_hold * 2)
        self._set_phase("hold", now)

    def _probe_passed(self, now: float) -> None:
        """The service took more than the estimate allows. Below an earlier good rate: go
        straight back to it (undone by the first refusal). Else measure how much more."""
        quota = self._quota
        assert quota is not None
        self.probes_passed += 1
        self._slow_hold = self.hold
        self._calibrated = False
        self._unanchor()
        if self._good is not None and quota < self._good:
            self._fallback = quota
            self._jump_at = now
            self._stable_since = now
            if self._good >= self._ceiling:
                self._quota = None
                self._set_phase("ceiling", now)
            else:
                self._set_quota(self._good, now)
                self._quota_err = self._good_err
                self._synced = False
                self._set_phase("hold", now)
        else:
            self._set_phase("hold", now)
            self._set_phase("probe", now)
        self._new_epoch(now)

    def _jump_failed(self, permit: Permit, now: float) -> None:
        """Refused after going back to the good rate: the other job is still there."""
        assert self._fallback is not None
        self._quota = self._fallback
        self._bank = 0.0
        self._bank_at = now
        self._basis = now
        self._fallback = None
        self._refused(permit, now)
        self._set_phase("hold", now)
        self._new_epoch(now)

    def _cut(self, permit: Permit, now: float) -> None:
        """A surprise throttle: the quota went down. Cut blind, measure over the next trip."""
        self.cuts += 1
        self._fallback = None
        first = self._phase != "measure"
        current = self._rate(now)
        if self._phase == "measure":
            # Still refused: halve again, or lower to what the service accepted meanwhile.
            blind = self._blind_rate * self.blind_cut
            until = now - self._latency
            if until - self._drop_start >= 0.1:
                accepted = 0
                for p in self._recent:
                    if self._drop_start <= p.sent_at < until and p.outcome == "ok":
                        accepted += 1
                measured = accepted / (until - self._drop_start)
                blind = min(blind, max(measured, blind * self.blind_cut))
            self._blind_rate = max(self.min_rate, blind)
        else:
            self._remember_good(permit.sent_at, now)
            self._drop_start = permit.sent_at
            self._drop_from = permit.rate
            self._blind_rate = max(self.min_rate, min(current, permit.rate) * self.blind_cut)
            self._set_phase("measure", now)
            self._unanchor()
        self._calibrated = False
        self._drop_end = now
        self._slow_hold = self.hold
        self._new_epoch(now)
        self._note_cut(first, current, now)

    def _remember_good(self, refused_at: float, now: float) -> None:
        """Before a drop: keep the rate the service took until then, to go back to it when
        the drop ends (another job sharing the quota stops): the measured quota if it was,
        else what the requests accepted over the last ``T`` seconds prove: with a bucket
        ``server_burst`` deep, a quota of at least ``accepted / (T + server_burst)``."""
        start = max(self._stable_since, refused_at - 8.0)
        span = refused_at - start
        if span < self.server_burst:
            return
        if self._quota is not None and self._calibrated:
            good = self._quota  # measured, and held since
        else:
            accepted = 0
            for p in self._recent:
                if start <= p.sent_at < refused_at and p.outcome == "ok":
                    accepted += 1
            if accepted / span >= (1.0 - self.margin) * self._ceiling:
                good = self._ceiling  # held at the ceiling: the ceiling it is
            else:
                good = accepted / (span + self.server_burst)
        if self._good is None or good > self._good:
            self._good = good
            self._good_err = self._quota_err
            self._good_calibrated = good >= self._ceiling or self._calibrated
        self._good_at = now

    def _check_drop(self, now: float) -> None:
        """Once every request sent while the service refused has answered: measure."""
        window = [p for p in self._recent if self._drop_start <= p.sent_at < self._drop_end]
        if any(p.outcome is None for p in window):
            return
        # Sent after the last cut: if answered without a throttle (a throttle would mostly
        # have cut again and moved ``_drop_end``), the service takes at least the blind rate.
        after = [p for p in self._recent if p.sent_at >= self._drop_end and p.outcome]
        if len(after) < 2 and not (after and now - self._drop_end > 4 * self._latency):
            return
        refused = [p for p in window + after if p.outcome == "throttle"]
        first = min((p.sent_at for p in refused), default=self._drop_start)
        last = max((p.sent_at for p in refused), default=self._drop_start)
        if last > first:
            # Between two refusals the service's bucket went from empty to empty: what it
            # accepted in between is what it refilled.
            span = last - first
            between = [p for p in window + after if first < p.sent_at < last]
            accepted = sum(1 for p in between if p.outcome == "ok")
        else:
            span = max(0.0, window[-1].sent_at - window[0].sent_at) if window else 0.0
            span += 1.0 / max(self._drop_from, self.min_rate)
            accepted = sum(1 for p in window if p.outcome == "ok")
        err = max(0.05 * accepted / span, 1.0 / span)
        # Lean low: a rate still too high costs throttles and a second cut.
        floor = self._blind_rate if all(p.outcome != "throttle" for p in after) else 0.0
        if self._background > 0:
            # Refusals of the background among the quota's make the measure short: the
            # service took at least what it accepted lately.
            _, _, recent_ok, seconds = self._answered(now)
            if seconds > 0:
                floor = max(floor, 0.9 * recent_ok / seconds)
        measured = min(self._drop_from, max(floor, accepted / span - err / 2))
        self._quota = min(self._ceiling, max(self.min_rate, measured))
        self._quota_err = err
        self._bank_at = now
        self._set_phase("hold", now)
        self._bank = 0.0
        self._basis = now
        if refused:
            self._refused(max(refused, key=lambda p: p.sent_at), now)
        self._stable_since = now
        if self._good is not None and self._good <= self._quota * (1.0 + 2 * self.margin):
            self._good = None
        self._new_epoch(now)

    # -- internals: refusals that are not about the rate ------------------------------------

    def _answered(self, now: float) -> tuple[int, int, int, float]:
        """(sent, refused, ok, seconds) of the requests sent over the last
        ``background_window`` that have all answered. Refusals come back faster than
        answers, so the newest are left out."""
        end = now - 4.0 * self._latency
        return self._tally.window(max(self._started_at, end - self.background_window), end)

    def _overwhelming(self, now: float) -> bool:
        """A third of the requests refused or more (four at least): more than a background
        refuses (a busy service refuses a tenth or so)."""
        sent, refused, _, _ = self._answered(now)
        if sent == 0:
            # Nothing answered long enough ago: every answer so far, against every request
            # sent (refusals come back first).
            sent, refused, _, _ = self._tally.window(now - self.background_window, now + 1.0)
            sent += self._in_flight
        return refused >= 4 and refused >= 0.35 * sent

    def _within_background(self, now: float) -> bool:
        """Is the recent refused share within the learned background? (And while a drop is
        judged at a third of its first rate, no further cut: the answers there decide.)"""
        if self._drop is not None:
            return True
        if self.cuts == 0:
            # The first refusals of a run.
            answered, _, _, _ = self._tally.window(now - self.background_window, now + 1.0)
            if answered < self.test_requests and not self._overwhelming(now):
                # Too few answers at this rate yet to tell a cut's effect by: a refusal
                # among mostly accepted requests waits for more of them.
                return True
        background = self._background
        if background <= 0.0:
            return False
        sent, refused, _, _ = self._answered(now)
        if sent < self.test_requests:
            return True  # too few answers to see more than the background in them
        spread = 3.0 * math.sqrt(background * (1.0 - background) / sent)
        return refused / sent <= background + self.background_margin + spread

    def _note_cut(self, first: bool, before: float, now: float) -> None:
        """The first cut of a drop starts its judgement at the rate it cut to, unless the
        service refused next to nothing before it, or most of all (then the quota went
        down, plainly)."""
        if not first or self._drop is not None:
            return
        sent, refused, _, _ = self._answered(now)
        if sent >= self.test_requests and refused < 0.02 * sent:
            return
        if self._overwhelming(now):
            return  # most requests refused: no background refuses that many
        after = self._rate(now)
        self._drop = _Drop(start=now, before=before, level_rate=after, level_start=now)

    def _judge_drop(self, now: float) -> None:
        """Were a drop's refusals about the rate? Held at the first cut's rate: if the
        refusals stop, it was the quota (between the two rates). If they go on, the rate is
        halved once more and held: below the quota the refusals stop; under a quota below
        both rates as many are accepted as before; under the background the same share is
        refused and half as many accepted."""
        drop = self._drop
        assert drop is not None
        # Refusals come back faster than answers: judge by requests that have all answered.
        settled_by = now - 4.0 * self._latency
        sent, refused, ok, seconds = self._tally.window(drop.level_start, settled_by)
        known_before = True
        if drop.level == 2:
            share_first = drop.first_level[1] / drop.first_level[0]
        else:
            # The share refused before the drop, at the rate it cut from.
            back = self._tally.span_at(drop.start, drop.before, self.background_window)
            before_sent, before_refused, _, _ = self._tally.window(drop.start - back, drop.start)
            share_first = before_refused / before_sent if before_sent else 0.0
            known_before = before_sent >= self.test_requests
        # Enough answers to expect ten refusals, were the share the same.
        need = self.test_requests
        if share_first > 0:
            need = min(10 * self.test_requests, max(need, math.ceil(10.0 / share_first)))
        if (sent < need or seconds < 0.3) and now - drop.level_start < 5.0:
            return
        share = refused / sent if sent else 0.0
        # Below a quota its refusals stop altogether; the background's go on.
        least = 2 if drop.level == 1 else 1
        refusing = sent >= self.test_requests and refused >= least and share >= 0.01
        if drop.level == 1:
            if not refusing:
                self._drop = None  # the refusals stopped at the lower rate: the quota
                return
            if self._background > 0:
                # A background is known and the refusals rose above it. Still as high at
                # half the rate: the background is heavier than thought. Down towards it:
                # the quota's were on top; the limiter goes on from the cut.
                self._drop = None
                if known_before and _agree(refused, sent, share_first):
                    self._learn_background(drop, sent, refused, now)
                return
            if share < 0.15 and (not known_before or _agree(refused, sent, share_first)):
                # A light share refused as much at half the rate (or, at the very start of
                # a run, at all). A quota refusing this little at half the rate refused a
                # third or more before, and a drop is not judged then: the background.
                self._drop = None
                self._learn_background(drop, sent, refused, now)
                return
            drop.first_level = (sent, refused, ok, seconds)
            drop.level = 2
            drop.level_rate = max(self.min_rate, drop.level_rate / 2.0)
            drop.level_start = now
            self._new_epoch(now)
            return
        self._drop = None
        _, _, first_ok, first_seconds = drop.first_level
        ok_first = first_ok / first_seconds
        ok_second = ok / max(seconds, 1e-9)
        if refusing and ok_second <= 0.75 * ok_first:
            self._learn_background(drop, sent, refused, now)
        elif refusing:
            self._quota_measured(ok_second, now)  # as many accepted: a quota below both
        else:
            self._quota_measured(ok_first, now)  # refused at the first level only

    def _learn_background(self, drop: _Drop, sent: int, refused: int, now: float) -> None:
        """The drop's refusals were the background's: its share from the level judged,
        pooled with the first level and with the answers before the drop where they agree
        (more answers, a truer share; where they do not, they held the quota's refusals
        too). Then back to the rate before the drop."""
        back = self._tally.span_at(drop.start, drop.before, self.background_window)
        before = self._tally.window(drop.start - back, drop.start)
        total_sent, total_refused = sent, refused
        others = (drop.first_level[:2], before[:2]) if drop.level == 2 else (before[:2],)
        for other_sent, other_refused in others:
            if other_sent and _agree(total_refused, total_sent, other_refused / other_sent):
                total_sent += other_sent
                total_refused += other_refused
        self._background = total_refused / total_sent
        self._background_at = now
        self._undo_cut(drop.before, now)

    def _track_background(self, now: float) -> None:
        """Follow the background share: down as the service's refusals fade, slowly up."""
        self._background_at = now
        sent, refused, _, _ = self._answered(now)
        if sent < self.test_requests:
            return
        share = refused / sent
        if share < self._background:
            self._background = 0.7 * self._background + 0.3 * share
            if self._background < 0.005:
                self._background = 0.0
        elif self._within_background(now):
            # Slowly up: refusals just above the background may be the quota's.
            self._background = 0.9 * self._background + 0.1 * share

    def _quota_measured(self, accepted: float, now: float) -> None:
        """A drop judged to be the quota, refusing while held at one rate: the accepted
        rate there is the quota (its bucket was empty throughout)."""
        self._set_quota(accepted, now)
        self._quota_err = 0.05 * accepted
        self._bank = 0.0
        self._bank_at = now
        self._basis = now
        self._unanchor()
        self._set_phase("hold", now)
        self._stable_since = now
        self._new_epoch(now)

    def _undo_cut(self, rate: float, now: float) -> None:
        """Back to the rate before a cut whose refusals turned out not to be about it (or
        before the cuts just before it, for the same reason)."""
        horizon = now - 10.0
        rate = max([rate, *(p.rate for p in self._recent if p.sent_at >= horizon)])
        self._fallback = None
        self._good = None
        self._unanchor()
        self._calibrated = False
        if rate >= self._ceiling * (1.0 - 2 * self.margin):
            self._quota = None
            self._set_phase("ceiling", now)
        else:
            self._set_quota(rate / (1.0 - self.margin), now)
            self._bank = 0.0
            self._bank_at = now
            self._basis = now
            self._set_phase("hold", now)
        self._stable_since = now
        self._new_epoch(now)


def _agree(refused: int, sent: int, share: float) -> bool:
    """Could ``refused`` of ``sent`` have come from ``share``? (Three standard errors.)"""
    spread = 3.0 * math.sqrt(sent * share * (1.0 - share)) + 1.0
    return abs(refused - sent * share) <= spread


@dataclass(slots=True)
class _Drop:
    """A drop being judged: when it started and the rate before it; the level it holds
    (1: the first cut's rate, 2: half of that) and since when; the answers at level 1
    (sent, refused, ok, seconds)."""

    start: float
    before: float
    level_rate: float
    level_start: float
    level: int = 1
    first_level: tuple[int, int, int, float] = (0, 0, 0, 1.0)


class _Tally:
    """Answers counted by the tenth of a second they were sent in: (sent, refused, ok)
    over any recent window in O(window) time, whatever the rate."""

    STEP = 0.1
    HORIZON = 120  # tenths kept

    def __init__(self) -> None:
        self._base = 0
        self._slots: deque[list[float]] = deque()

    def add(self, permit: Permit, *, ok: bool, refused: bool) -> None:
        index = int(permit.sent_at / self.STEP)
        if not self._slots:
            self._base = index
        if index < self._base:
            return  # older than the horizon
        while index >= self._base + len(self._slots):
            self._slots.append([0, 0, 0, 0.0])
        slot = self._slots[index - self._base]
        slot[0] += 1
        slot[1] += refused
        slot[2] += ok
        slot[3] += permit.rate
        while len(self._slots) > self.HORIZON:
            self._slots.popleft()
            self._base += 1

    def span_at(self, end: float, rate: float, longest: float) -> float:
        """How far back from ``end`` (at most ``longest`` seconds) requests were sent at
        ``rate`` or faster: the window the answers at that rate can be read from."""
        last = min(int(end / self.STEP) - self._base, len(self._slots)) - 1
        first = max(int((end - longest) / self.STEP) - self._base, 0)
        i = last
        while i >= first:
            slot = self._slots[i]
            if slot[0] and slot[3] / slot[0] < 0.9 * rate:
                break
            i -= 1
        return (last - i) * self.STEP

    def window(self, start: float, end: float) -> tuple[int, int, int, float]:
        """(sent, refused, ok, seconds) of the requests sent from ``start`` to ``end``, in
        the whole tenths between them (``seconds`` is the span the tenths cover)."""
        first = max(math.ceil(start / self.STEP) - self._base, 0)
        last = min(int(end / self.STEP) - self._base, len(self._slots))
        sent = refused = ok = 0.0
        for i in range(first, last):
            slot = self._slots[i]
            sent += slot[0]
            refused += slot[1]
            ok += slot[2]
        return int(sent), int(refused), int(ok), max(0, last - first) * self.STEP
