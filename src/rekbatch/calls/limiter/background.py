"""The background-throttle detector: refusals that are not about the rate.

A service under load (or with noisy neighbours) refuses a steady share of requests whatever
the rate; the quota refuses more the faster one sends, and none below it. Cutting the rate
for the first kind only loses time, so the detector learns that share (the *background*)
and lets a refusal count for the rate only when the refused share since the rate last changed
(the last ``background_window`` seconds of it) rises clearly above it: past ``background +
background_margin + alarm`` standard errors, over at least ``test_requests`` answers. Shares are
read from settled traffic only (see ``traffic``).

It learns the background from a *trial* of the limiter's first cut, whenever the service
refused a share before that cut that a background could explain (more than
``clean_share``, less than ``overwhelming_share``). The rate is held at the cut's rate
(level 1) until enough requests sent there have answered:

- the refusals stopped: they were the quota's, which lies between the two rates;
- refused at the same share (a light one, or one agreeing with the share before the cut):
  the background; the cut is undone;
- otherwise the rate is halved once more (level 2, from the rate actually sent at level 1)
  and held: under the background the same share is refused and the accepted rate halves;
  under a quota below both rates as many are accepted as before (that is the quota); if the
  refusals stopped, the quota lies between the levels and the level-1 accepted rate is it
  (judged on more answers than level 1: level 1's share, read from a few dozen answers,
  may be twice the truth, and none refused by chance would set a quota to hold).

A level that has not had ``test_requests`` answers after ``trial_longest`` seconds (a client
held up by its own processor) shows nothing: the cut is undone and nothing is learned.

The background is then followed: down as the service's refusals fade, up while they stay
within it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rekbatch.calls.limiter.settings import LimiterSettings
from rekbatch.calls.limiter.traffic import Counts, Traffic


def agree(refused: int, answered: int, share: float, spread: float) -> bool:
    """Could ``refused`` of ``answered`` have come from ``share``? (Within ``spread``
    standard errors, and one request.)"""
    deviation = spread * math.sqrt(answered * share * (1.0 - share)) + 1.0
    return abs(refused - answered * share) <= deviation


@dataclass(slots=True)
class Trial:
    """A cut under judgement: when it was made, the rate before it, the level held (1: the
    cut's rate, 2: half the rate sent at level 1) and since when; the answers at level 1."""

    start: float
    before: float
    level_rate: float
    level_start: float
    level: int = 1
    first_level: Counts | None = None
    opened_at_share: float = 0.0
    """The recent refused share when the trial opened (all answers so far, if none had
    settled): what to expect at level 1 while the share before the cut is not known."""


VerdictKind = Literal["wait", "release", "background", "next_level", "quota"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a trial found. ``release``: the refusals were the quota's, above the cut's rate
    (the cut stands; the quota is at least ``rate``, which was sent without them).
    ``background``: they were not about the rate (the cut is undone, back to ``rate``).
    ``next_level``: halved again to see. ``quota``: the quota is ``rate``."""

    kind: VerdictKind
    rate: float = 0.0


_WAIT = Verdict("wait")


class BackgroundDetector:
    def __init__(self, settings: LimiterSettings, now: float) -> None:
        self._settings = settings
        self.share = 0.0
        """The share of requests the service refuses whatever the rate, as learned."""
        self._known_from = 0
        """How many answers the share was read from (its own error shrinks with them)."""
        self._tracked_at = now
        self.trial: Trial | None = None
        self._rate_since = now  # the rate has been what it is since

    def rate_changed(self, now: float) -> None:
        """The limiter's rate changed: answers from before no longer tell about it."""
        self._rate_since = now

    # -- does a refusal count for the rate? ---------------------------------------------

    def _recent(self, traffic: Traffic, now: float) -> Counts:
        return traffic.latest(now, self._settings.background_window)

    def _at_this_rate(self, traffic: Traffic, now: float) -> Counts:
        """The last ``background_window`` seconds of settled answers, sent at the rate
        set now."""
        start = max(self._rate_since, now - self._settings.background_window)
        return traffic.window(start, now)

    def overwhelming(self, traffic: Traffic, now: float) -> bool:
        """So many refused (over ``overwhelming_share``, by more than chance among few
        answers) that no background explains it (a busy service refuses a tenth or so):
        the quota, plainly."""
        settings = self._settings
        recent = self._recent(traffic, now)
        refused, answered = recent.refused, recent.answered
        if answered == 0:
            # Nothing settled yet: every answer so far against every request sent (the
            # refusals come back first).
            everything = traffic.window(
                now - settings.background_window, now + settings.bin_seconds, settled=False
            )
            refused, answered = everything.refused, everything.sent
        share = settings.overwhelming_share
        chance = settings.spread * math.sqrt(answered * share * (1.0 - share))
        return refused >= settings.overwhelming_count and refused >= share * answered + chance

    def counts_for_rate(self, traffic: Traffic, now: float, *, cut_before: bool) -> bool:
        """Does a refusal now count for the rate? Not while a trial decides; not among the
        first answers of a run (unless overwhelming); not within the background."""
        settings = self._settings
        if self.trial is not None:
            return False
        if not cut_before:
            answered = traffic.window(
                now - settings.background_window, now + settings.bin_seconds, settled=False
            )
            if answered.answered < settings.test_requests and not self.overwhelming(traffic, now):
                return False  # too few answers yet to tell what a cut would change
        background = self.share
        if background <= 0.0:
            return True
        recent = self._at_this_rate(traffic, now)
        if recent.answered < settings.test_requests:
            return False  # too few to see more than the background in them
        # The error of the difference: of the recent share, and of the background's own.
        known_from = max(self._known_from, settings.test_requests)
        error = math.sqrt(
            background * (1.0 - background) * (1.0 / recent.answered + 1.0 / known_from)
        )
        return recent.share > background + settings.background_margin + settings.alarm * error

    # -- trials -------------------------------------------------------------------------

    def open_trial(
        self,
        traffic: Traffic,
        now: float,
        before: float,
        level_rate: float,
        refused_at: float | None = None,
    ) -> None:
        """The first cut of a drop, from ``before`` to ``level_rate``, made for a refusal of
        a request sent at ``refused_at``: judge it, unless the service refused next to
        nothing before that request (the refusals are new) or most of all (the quota,
        plainly)."""
        settings = self._settings
        if self.trial is not None:
            return
        first = now if refused_at is None else refused_at
        earlier = traffic.window(first - settings.background_window, first)
        clean = earlier.refused < settings.clean_share * earlier.answered
        if earlier.answered >= settings.test_requests and clean:
            return  # (too few answers before it to tell: the trial will)
        recent = self._recent(traffic, now)
        if self.overwhelming(traffic, now):
            return
        if recent.answered == 0:
            recent = traffic.window(
                now - settings.background_window, now + settings.bin_seconds, settled=False
            )
        self.trial = Trial(
            start=now,
            before=before,
            level_rate=level_rate,
            level_start=now,
            opened_at_share=recent.share,
        )

    def _share_before(self, traffic: Traffic, trial: Trial) -> Counts:
        """The answers to what was sent at the rate before the trial's cut."""
        back = traffic.span_at(trial.start, trial.before, self._settings.background_window)
        return traffic.window(trial.start - back, trial.start)

    def judge(self, traffic: Traffic, now: float) -> Verdict:
        """Were the trial's refusals about the rate? (See the module's docstring.)"""
        settings = self._settings
        trial = self.trial
        assert trial is not None
        level = traffic.window(trial.level_start, now)
        known_before = True
        if trial.first_level is not None:
            share_first = trial.first_level.share
        else:
            before = self._share_before(traffic, trial)
            share_first = before.share
            known_before = before.answered >= settings.test_requests
        if now - trial.level_start < settings.trial_longest:
            expected = share_first if known_before else trial.opened_at_share
            if trial.level == 2:
                # None refused at level 2 sets the quota, held for a while: the share at
                # level 1, read from a few dozen answers, may be far heavier than the truth.
                expected *= settings.level_two_doubt
            if level.answered < self._need(expected, level):
                return _WAIT
            if level.seconds < settings.trial_least_seconds:
                return _WAIT
        elif level.answered < settings.test_requests:
            # Too few answers even after so long (a client held up by its own processor):
            # nothing shows the refusals were about the rate. The cut is undone, nothing is
            # learned; refusals that go on open another trial.
            self.trial = None
            return Verdict("background", trial.before)
        if trial.level == 1 and self.share > 0:
            return self._judge_over_background(traffic, trial, level, share_first, now)
        # Below a quota its refusals stop altogether; the background's go on.
        least = settings.trial_refusals_level1 if trial.level == 1 else 1
        refusing = (
            level.answered >= settings.test_requests
            and level.refused >= least
            and level.share >= settings.trial_least_share
        )
        if trial.level == 1:
            if not refusing:
                self.trial = None
                return Verdict("release", self._sent_rate(trial, level))
            agrees = agree(level.refused, level.answered, share_first, settings.spread)
            if level.share < settings.light_share and (not known_before or agrees):
                # A light share refused as much at the lower rate (or, at the very start
                # of a run, at all). A quota refusing this little at the lower rate refused
                # far more before, and a trial is not opened then: the background.
                self.trial = None
                self._learn(traffic, trial, level, now)
                return Verdict("background", trial.before)
            # A heavier share: a quota below this level too, or a heavy background. Only
            # the accepted rate at a lower level tells them apart.
            return self._next_level(trial, level, now)
        self.trial = None
        first = trial.first_level
        assert first is not None
        # (With a background known, refusals within it do not count at level 2.)
        refusing = refusing and level.share >= self._stopped_below(level.answered)
        if refusing and level.ok_rate <= settings.proportional * first.ok_rate:
            self._learn(traffic, trial, level, now)
            return Verdict("background", trial.before)
        if refusing:
            return Verdict("quota", level.ok_rate)  # as many accepted: a quota below both
        return Verdict("quota", first.ok_rate)  # refused at the first level only

    def _need(self, share_first: float, level: Counts) -> int:
        """Answers at a level before it is judged: enough to expect ``trial_refusals``
        refusals at the share before the cut (or, not known, the share seen so far); with
        a background known, enough to tell that share from the background's."""
        settings = self._settings
        guess = share_first if share_first > 0 else level.share
        need = settings.test_requests
        if guess > 0:
            need = max(need, math.ceil(settings.trial_refusals / guess))
        gap = abs(share_first - self.share)
        if self.share > 0 and gap > 0:
            mean = (share_first + self.share) / 2
            need = max(need, math.ceil(mean * (1.0 - mean) * (settings.spread / gap) ** 2))
        return min(settings.trial_most * settings.test_requests, need)

    def _judge_over_background(
        self, traffic: Traffic, trial: Trial, level: Counts, share_first: float, now: float
    ) -> Verdict:
        """Level 1 of a trial opened with a background known (the share refused rose above
        it): refused at the cut's rate no more than the background, the quota's refusals
        were on top (it lies above the level); as much as before the cut, the background
        got heavier (learned again, the cut undone); in between, a quota at or below the
        level, or a heavier background: the accepted rate at a lower level tells."""
        settings = self._settings
        if level.share < self._stopped_below(level.answered):
            self.trial = None
            return Verdict("release", self._sent_rate(trial, level))
        if agree(level.refused, level.answered, share_first, settings.spread):
            self.trial = None
            self._learn(traffic, trial, level, now)
            return Verdict("background", trial.before)
        return self._next_level(trial, level, now)

    def _next_level(self, trial: Trial, level: Counts, now: float) -> Verdict:
        trial.first_level = level
        trial.level = 2
        trial.level_rate = max(self._settings.min_rate, self._sent_rate(trial, level) / 2.0)
        trial.level_start = now
        return Verdict("next_level")

    @staticmethod
    def _sent_rate(trial: Trial, level: Counts) -> float:
        """The rate actually sent at the trial's level (at most the level's rate)."""
        if level.seconds <= 0 or level.sent == 0:
            return trial.level_rate
        return min(trial.level_rate, level.sent / level.seconds)

    def _stopped_below(self, answered: int) -> float:
        """The share under which refusals at a level count as stopped: next to none, or
        within the known background."""
        settings = self._settings
        background = self.share
        if background <= 0:
            return settings.trial_least_share
        spread = settings.spread * math.sqrt(background * (1.0 - background) / max(1, answered))
        return background + settings.background_margin + spread

    def within(self, refused: int, answered: int) -> bool:
        """Are ``refused`` of ``answered`` within the known background (none if none)?"""
        if answered == 0:
            return True
        if self.share <= 0:
            return refused == 0
        return refused / answered < self._stopped_below(answered)

    def _learn(self, traffic: Traffic, trial: Trial, level: Counts, now: float) -> None:
        """The trial's refusals were the background's: its share from the level judged,
        pooled with the first level and with the answers before the cut where they agree
        (more answers, a truer share; where they do not, those held the quota's refusals
        too)."""
        answered, refused = level.answered, level.refused
        before = self._share_before(traffic, trial)
        others = [before] if trial.first_level is None else [trial.first_level, before]
        for other in others:
            if other.answered and agree(refused, answered, other.share, self._settings.spread):
                answered += other.answered
                refused += other.refused
        self.share = refused / answered
        self._known_from = answered
        self._tracked_at = now

    # -- following it -------------------------------------------------------------------

    def track(self, traffic: Traffic, now: float) -> None:
        """Every ``background_window`` seconds: follow the share down as the service's
        refusals fade (below ``forget_share`` it is gone), and up while they stay within
        it (above it, they may be the quota's: that is for a trial)."""
        settings = self._settings
        if self.share <= 0 or now - self._tracked_at < settings.background_window:
            return
        self._tracked_at = now
        recent = self._at_this_rate(traffic, now)
        if recent.answered < settings.test_requests:
            return
        if recent.share < self.share or not self.counts_for_rate(traffic, now, cut_before=True):
            self.share += settings.track_weight * (recent.share - self.share)
            # An average over about 1 / weight readings.
            most = round(recent.answered / settings.track_weight)
            self._known_from = min(most, self._known_from + recent.answered)
        if self.share < settings.forget_share:
            self.share = 0.0
