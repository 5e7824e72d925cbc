"""The adaptive rate limiter: one per Rekognition operation, shared by all the run's calls.

Rekognition's quota is per operation, Region and account, enforced by a token bucket that
refills at the quota and holds about one second of it. Past it the service refuses
(``ProvisionedThroughputExceededException``). A busy service also refuses a share of requests
whatever the rate (``ThrottlingException``). The limiter keeps a run at the available quota
with almost no refusals, whether the quota is known (``ceiling``), unknown (the ceiling only
bounds it) or shared with a job that comes and goes, and does not slow down for refusals
that are not about the rate.

``calls.caller.Caller`` uses it around every request (each retry is a new request)::

    permit = await limiter.acquire()         # waits its turn: paced, first come first served
    ... the request ...
    limiter.on_success(permit)               # or on_throttle(permit), or on_error(permit)

The parts, one job each:

- ``permit.Permit``: one request's leave to go: when it was sent, at which rate and epoch,
  and how it was answered.
- ``pacer.Pacer``: the client's own token bucket at the current rate (a small burst), and
  at most rate x round trip x 2 requests in flight (Little's law).
- ``traffic.Traffic``: what was sent and how it was answered, by tenth of a second of
  sending; shares of refusals are read only where every request has answered (refusals come
  back first, so a window read early over-counts them, the more so when latency jitters).
- ``service_bucket.ServiceBucketModel``: the service's bucket as the client sees it: it
  refills at the quota in use, each request books a token, a refusal hands its token back
  and re-syncs the model (the bucket was empty when the refused request arrived).
- ``quota``: measures the quota from refusals: between two of them the service's bucket
  went from empty to empty, so what it accepted in between is what it refilled.
  ``RefusalMeter`` measures across refusals seconds apart (precise: *calibrated*);
  ``CutWindow`` from the requests around a cut (rough, leaned low).
- ``probing.Prober``: when to look for more (holds between probes), how fast (spend what
  the model says is banked, then crawl above the quota), how far (past the model's empty
  point by more than its error), and what a probe's answers mean.
- ``recovery.GoodRate``: a higher rate the service took before a drop, to jump back to.
- ``background.BackgroundDetector``: the share refused whatever the rate; whether a
  refusal counts for the rate; the trial that tells the two kinds apart.
- ``settings.LimiterSettings``: every number above, named, with its unit and reason.
- ``limiter.AdaptiveLimiter``: puts them together and moves between the phases below.

The phases (``snapshot()["phase"]``) and what moves the limiter between them::

    from     on                                                    to
    ceiling  a refusal that counts for the rate                    cut
    cut      a refusal of a request sent after the cut             cut (deeper)
    cut      all sent while refused has answered                   hold (quota measured)
    cut      a trial: the refusals were the background             back to the rate before
    cut      a trial: the quota lies above the level               probe (measuring)
    hold     a second refusal within ``strike``                    cut
    hold     the hold time is over                                 probe
    probe    past the model's empty point by more than its error   verify
    probe    a refusal                                             hold
    verify   a refusal                                             hold
    verify   all taken, below a rate remembered from before a drop hold there (a jump)
    verify   all taken, nothing remembered                         probe (measuring)
    probe    a measuring probe held at its limit                   a jump: to the ceiling, or
                                                                   to a remembered rate
    hold     a refusal soon after a jump                           hold at the quota before

- **ceiling**: at the ceiling; no quota known. The first refusal that counts for the rate
  (see *background*) means the quota is lower: **cut**.
- **cut**: the rate drops blind to ``blind_cut`` of what was actually being sent (not of
  the allowance: a client held up by its own processor sends less). A refusal of a request
  sent after the cut took effect cuts again (once per round trip at most: older replies
  belong to an older *epoch*). Once everything sent while the service refused has
  answered, ``CutWindow`` measures the quota: **hold**.
- **hold**: at ``quota x (1 - margin)``, so the service's bucket banks a little. One refusal
  re-syncs the model (jitter, or the model's error); a second within ``strike`` means the
  quota went down again: **cut**. Refusals seconds apart measure the quota precisely.
- **probe**: after ``hold`` seconds (doubling while probes fail; ``recover_hold`` while
  below an earlier good rate): spend what the model says is banked, then crawl above the
  quota; past the model's empty point by more than its error: **verify**, wait for those
  answers. A refusal: the quota holds (and is measured again): **hold**. All taken (some
  accepted, none refused for the rate): the service takes more; below an earlier good rate,
  jump straight back to it (undone by the first refusal within ``jump_seconds``);
  otherwise a *measuring* probe whose crawl doubles until the service refuses (which
  measures the quota) or it holds at its limit for a second: a jump there too (to the
  ceiling: **ceiling**), since a full bucket can hide a lower quota for longer.

The background: a refusal counts for the rate only when the refused share of the answers
since the rate last changed (up to ``background_window`` seconds of them) is clearly above
the learned background share (and, before the first cut, only once ``test_requests`` have
answered, unless they are overwhelmingly refused). Refusals within the background are
retried by the caller with backoff; the rate does not move. The background is learned from
a *trial* of a cut, opened when the share refused before it could be a background (more
than 2%, not overwhelming): the rate is held at the cut's level until enough answers are in:

- no background known yet: refusals that stop were the quota's (it lies between the two
  rates: the limiter probes up from the level at once); the same light share at the lower
  rate is the background (the cut is undone); otherwise the rate is halved again, and an
  accepted rate that halves too means the background, one that stays the same is the quota;
- a background known (its share rose): refused at the level no more than the background,
  the quota's refusals were on top (probe up from the level); as much as before the cut,
  the background got heavier (learned again, the cut undone); in between, halved again as
  above, counting only refusals beyond the background.

``try_acquire()`` and ``ready_in()`` answer without waiting, for a caller choosing among
several limiters (one per Region, say) the one that can grant first.
"""

from rekbatch.calls.limiter.limiter import AdaptiveLimiter, LimiterCounts, Phase
from rekbatch.calls.limiter.permit import Outcome, Permit
from rekbatch.calls.limiter.settings import LimiterSettings

__all__ = ["AdaptiveLimiter", "LimiterCounts", "LimiterSettings", "Outcome", "Permit", "Phase"]
