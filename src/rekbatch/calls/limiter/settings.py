"""Every number the limiter decides by, named, with its unit and why it has that value.

The defaults suit Rekognition: a token bucket per operation refilling at the quota with about
one second of burst, answers in about 150 ms (refusals sooner), and, when the service is
busy, a share of ``ThrottlingException`` whatever the rate. They were tuned on the virtual-
time simulations of ``tests/test_ratelimit.py`` (quotas 20 to 100 a second, a quota that
halves, 10% and 20% background refusals, a client whose processor is shared) and checked
with ``benchmarks/bench_ratelimit.py`` and ``benchmarks/bench_faults.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    # -- pacing (pacer.py) ----------------------------------------------------------------
    min_rate: float = 0.2
    """Requests/s the rate never goes below: a trickle still notices a quota coming back."""
    burst: float = 0.05
    """Seconds of rate the client's own bucket banks (at least one request): absorbs the
    event loop waking a little late, never a stampede of the whole pool."""
    concurrency_margin: float = 2.0
    """In flight at most rate x round trip x this (Little's law, with room for the round
    trip to double before pacing is held up by it)."""
    min_concurrency: int = 4
    """In flight at least this many, whatever the rate: a slow trickle still overlaps."""
    initial_latency: float = 1.0
    """Seconds of round trip assumed before the first answer (generous: it only bounds the
    requests in flight until then)."""
    latency_weight: float = 0.1
    """Weight of each accepted answer in the average round trip (about the last ten)."""

    # -- the record of traffic (traffic.py) -----------------------------------------------
    bin_seconds: float = 0.1
    """Seconds of sending per bin: fine enough to follow a cut within a round trip."""
    bin_horizon: float = 12.0
    """Seconds of bins kept: the longest window read (a rate before a cut, a trial)."""
    recent_seconds: float = 10.0
    """Seconds of single requests kept (measures that need each one)..."""
    recent_trips: float = 20.0
    """...or this many round trips, if longer."""
    same_rate: float = 0.9
    """Sent at this fraction of a rate or more counts as sent at that rate (the rate
    before a cut, whose refused share a trial compares with)."""

    # -- the model of the service's bucket (service_bucket.py) ----------------------------
    server_burst: float = 1.0
    """Seconds of quota the service's bucket holds (Rekognition: about one)."""
    margin: float = 0.03
    """Runs this fraction under the measured quota: the service's bucket banks a little,
    which absorbs the measure's error and the latency's jitter; 3% lost at most."""
    same_rate_margins: float = 2.0
    """Two rates within this many margins are the same (a quota measured again, about
    as high as one remembered; a rate back near the ceiling)."""
    resync_level: float = 0.5
    """Tokens the model holds just after a refusal: the service's bucket was empty when the
    refused request arrived, half a request's slot before or after, on average."""

    # -- cuts and the quota measured after one (limiter.py, quota.py) ---------------------
    blind_cut: float = 0.5
    """The first cut keeps this share of the rate sent (a quota that halves, another job
    of the same size starting, is under it at once); later cuts halve again."""
    send_rate_window: float = 2.0
    """Seconds over which the rate actually sent is measured for a cut: a client held up
    by its own processor sends slower than it is allowed, and a cut of the allowance alone
    would change nothing. Long enough that a stall of the process does not count as the
    rate."""
    cut_echo: float = 0.25
    """Seconds after a cut during which refusals are still the old rate's echo (requests
    sent just after a cut meet a service bucket emptied before it)..."""
    cut_echo_trips: float = 0.5
    """...or this many round trips, if shorter."""
    cut_answers: int = 2
    """Answers to requests sent after a cut needed before its measure..."""
    cut_wait_trips: float = 4.0
    """...or one, and this many round trips."""
    cut_measure_span: float = 0.1
    """Seconds since the first refusal needed before a second cut goes to what the service
    accepted meanwhile (fewer: too few requests to count)."""
    cut_error: float = 0.05
    """Relative error of a quota measured from one drop (at least one request over its
    span): a measure from a few tenths of a second of requests."""
    cut_floor: float = 0.9
    """With refusals that are not about the rate about, a quota measured after a cut is at
    least this share of what the service accepted since the first refusal."""
    strike: float = 2.0
    """Seconds within which a second refusal under the quota means the quota went down
    (once is the model's error, or jitter)..."""
    strike_requests: float = 10.0
    """...or the time of this many requests at the quota, if longer."""
    calibration_span: float = 2.0
    """Seconds between two refusals for a measure of the quota a probe can trust (about a
    request over the span: 1% at 50 a second)."""

    # -- probing (probing.py) -------------------------------------------------------------
    hold: float = 15.0
    """Seconds at a measured quota before probing for more..."""
    max_hold: float = 60.0
    """...doubling up to this while probes fail (each costs about one refusal)."""
    recover_hold: float = 3.0
    """Seconds between probes while below a rate the service took before a drop: a quota
    that comes back is found within a few seconds."""
    rough_hold: float = 6.0
    """Seconds between probes while the quota is only a rough measure (from a drop): the
    next probe, which measures, comes soon."""
    probe_fast: float = 0.5
    """A probe spends what the model says is banked at the quota x (1 + this)."""
    tolerance: float = 1.0
    """Banked requests under which the fast spending ends (the model's rounding)."""
    probe_crawl: float = 0.1
    """Then it crawls at the quota x (1 + this): past the empty point, each request over
    the quota is one the service would refuse..."""
    recover_crawl: float = 0.3
    """...or, below a rate taken before a drop, this share of the way back (and at least
    of the quota): each probe while the quota is still down costs about one refusal, and the
    time a probe takes adds to the time to find the quota back (about 4 s, holds included)..."""
    min_crawl: float = 2.0
    """...and at least this many requests/s above it, so a low quota is probed too."""
    probe_double: float = 0.5
    """Seconds in which a measuring probe's crawl doubles: from 10% over the quota to twice
    it in about 2 s."""
    probe_depth: float = 2.0
    """Requests past the model's empty point (beyond its error) before a probe counts as
    passed: two accepted where none should have been."""

    # -- coming back (recovery.py) --------------------------------------------------------
    memory: float = 120.0
    """Seconds a rate the service took before a drop is remembered: another job sharing
    the quota for longer is not coming back soon..."""
    reached_hold: float = 6.0
    """...or until the quota held has come back up to it and held this long."""
    good_window: float = 8.0
    """Seconds of accepted requests before a drop that prove what the service took."""
    ceiling_proof: float = 4.0
    """Seconds at the ceiling, refused nothing, after which the ceiling is the rate to come
    back to (the service's full bucket hides a quota of half the rate for one second: at the
    start of a run, the ceiling proves nothing)."""
    jump_seconds: float = 5.0
    """A jump back to the remembered rate holds once it lasts this long without a
    refusal (a full bucket hides a quota still down for a while: 50 banked, sent 25/s
    over it, is 2 s)..."""
    jump_trips: float = 4.0
    """...and this many round trips."""
    undo_horizon: float = 10.0
    """Seconds back over which the highest rate sent is restored when a cut is undone
    (the cuts just before it were about the same refusals)."""

    # -- the background-throttle detector (background.py) ---------------------------------
    background_window: float = 2.0
    """Seconds of settled requests the recent refused share is read from."""
    background_margin: float = 0.02
    """A refusal counts for the rate when the recent share passes the background by this
    plus ``alarm`` standard errors."""
    spread: float = 3.0
    """Standard errors two shares may differ by and still be the same (one in 400 apart
    by chance)."""
    alarm: float = 4.0
    """Standard errors above the background (plus ``background_margin``) before a refusal
    counts for the rate: the share is read again at every refusal, a hundred times a
    minute, and the background itself is only known to a standard error or two; a quota
    refuses far more than that."""
    test_requests: int = 20
    """The fewest answers a share is read from (a tenth of 20 is two refusals)."""
    overwhelming_share: float = 0.35
    """Refused more than this share (by more than ``spread`` standard errors, and at least
    ``overwhelming_count``): no background refuses that many (a busy service refuses a
    tenth or so): the quota, plainly."""
    overwhelming_count: int = 4
    clean_share: float = 0.02
    """Refused less than this before a cut: the refusals are new, the quota's, plainly."""
    trial_refusals: int = 6
    """A trial waits for enough answers to expect this many refusals at the share before
    the cut (the rate is held low meanwhile: a tenth refused, 60 answers)..."""
    trial_most: int = 10
    """...but no more than this many times ``test_requests``..."""
    trial_least_seconds: float = 0.3
    """...and for at least this many seconds of them..."""
    trial_longest: float = 5.0
    """...and judges anyway after this many seconds at a level (undoes the cut, if it still
    has fewer than ``test_requests`` answers). Ten seconds cost the halving simulations with
    fast refusals up to 6% of the quota on some seeds."""
    level_two_doubt: float = 0.5
    """At level 2, enough answers to expect ``trial_refusals`` at this share of level 1's
    share: none refused there means a quota, held; level 1's share, from a few dozen
    answers, can be twice the background's (10% read as 21% from 42 answers, and then
    none of 28 at level 2 is one chance in twenty)."""
    trial_refusals_level1: int = 2
    """Refusals at level 1 that mean the refusals go on (one may be the old rate's)."""
    trial_least_share: float = 0.01
    """A share under this at a level means the refusals stopped."""
    light_share: float = 0.15
    """A share this light, the same at the cut's rate, is the background: a quota that
    refused so little at the lower rate refused over a third before, and no trial is opened
    for that."""
    proportional: float = 0.75
    """At level 2 (half the rate), accepted at most this share of level 1's rate means the
    accepted rate followed the rate down: the background. (Half, with room for noise.)"""
    track_weight: float = 0.3
    """Weight of each reading (every ``background_window`` seconds) in the background
    share: a share learned from a hundred answers is off by a third, and is right within a
    few readings."""
    forget_share: float = 0.005
    """Below this the background is gone."""
