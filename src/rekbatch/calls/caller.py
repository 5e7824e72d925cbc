"""The only place a ``Backend`` is called: the API's shared limiter, retries, and counters.

Every request waits for its API's ``AdaptiveLimiter``, goes to the backend, and settles the
permit with what happened. A retryable failure waits a jittered backoff and tries again, up
to ``max_attempts``; the outcome is the response or the last error, never an exception: a
failed call is a property of one image. Anything else a backend raises is a bug in it, and
propagates to the run's supervisor, as do the three ways a call stops the run:

- ``Interrupted``: the run is stopping (``stopping`` is set): no call is retried. (A first
  attempt still goes: its object is in flight, and the grace period bounds it.)
- ``CredentialsRefused``: the service refused the credentials, and again once the backend
  reloaded them (``refresh_credentials``). No attempt is used on such a refusal: the
  service did not take the request.
- ``EndpointNeverReached`` / ``EndpointUnreachable``, from ``Reachability``.

Over a network (``backend.network``) every request has a deadline that fits the service's
observed latency: ``TIMEOUT_FACTOR`` times the p99 of recent answers, within
``TIMEOUT_FLOOR`` and ``TIMEOUT_CEILING`` seconds, plus the time its upload takes at
``UPLOAD_FLOOR_BYTES_PER_SECOND``, so a connection that dies without an answer costs
seconds, and a large image sent as bytes is not cut off for being large. An expired
deadline uses an attempt: the request may have reached the service and been billed. So does
any failure after a connection was made (classified ``exchange``). Only a failure to connect
(``connect``: nothing reached the service) is retried without using up attempts, for as
long as the endpoint is not down.

With several Regions (``regions``, see ``calls.regions``) a stateless call takes a ``Route``
instead of its API's limiter: the same interface over every Region's limiter, and the
backend of the Region that granted the permit. A failure that was the Region's goes to
another Region without using an attempt.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from rekbatch.backends.base import Backend, ImageInput
from rekbatch.calls.classify import may_have_been_done
from rekbatch.calls.limiter import AdaptiveLimiter
from rekbatch.calls.quotas import resolve_ceilings
from rekbatch.calls.retry import Reachability, RetryPolicy
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.errors import BackendError, CredentialsRefused, Interrupted

log = structlog.get_logger("rekbatch")

if TYPE_CHECKING:
    from rekbatch.calls.regions import Regions, Route

TIMEOUT_FACTOR = 5.0
TIMEOUT_FLOOR = 3.0
TIMEOUT_CEILING = 60.0
TIMEOUT_UNKNOWN = 30.0  # before enough answers to know the latency
UNREACHABLE_SECONDS = 120.0
# The slowest upload a deadline allows for: 2 Mbit/s. An image sent as bytes shares the
# uplink with every other request in flight, so its own share can be a small part of it.
UPLOAD_FLOOR_BYTES_PER_SECOND = 256 * 1024


@dataclass(slots=True)
class CallOutcome:
    """A request's end: the response or the last error, the attempts it took, and the
    seconds spent on the wire and in backoff (not waiting for the first permit).
    ``unsure``: failed attempts the service may have carried out all the same (no answer
    said otherwise; ``classify.may_have_been_done``)."""

    result: dict[str, Any] | None
    error: BackendError | None
    attempts: int
    seconds: float
    unsure: int = 0


@dataclass
class CallStats:
    calls: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    throttles: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    connection_errors: Counter[str] = field(default_factory=Counter)
    credential_errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "calls": dict(self.calls),
            "ok": dict(self.ok),
            "throttles": dict(self.throttles),
            "retries": dict(self.retries),
            "failures": dict(self.failures),
            "connection_errors": dict(self.connection_errors),
            "credential_errors": dict(self.credential_errors),
        }


class LatencyWindow:
    """The p99 of an API's recent answers, recomputed every ``every`` answers."""

    def __init__(self, size: int = 512, every: int = 64) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._every = every
        self._count = 0
        self.p99: float | None = None

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._count += 1
        if self._count % self._every == 0 or (self.p99 is None and self._count >= 20):
            ordered = sorted(self._samples)
            self.p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def deadline(self) -> float:
        if self.p99 is None:
            return TIMEOUT_UNKNOWN
        return min(TIMEOUT_CEILING, max(TIMEOUT_FLOOR, TIMEOUT_FACTOR * self.p99))


def upload_bytes(images: dict[str, ImageInput]) -> int:
    """The bytes a request's images add to its body (base64, as JSON carries them)."""
    return sum(4 * ((len(image.data) + 2) // 3) for image in images.values() if image.data)


class Caller:
    def __init__(
        self,
        backend: Backend,
        *,
        max_tps: float | dict[str, float] | None,
        region: str,
        retry: RetryPolicy,
        apis: list[str] | None = None,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
        unreachable_seconds: float = UNREACHABLE_SECONDS,
        first_contact_seconds: float | None = None,
        share: float = 1.0,
        stopping: asyncio.Event | None = None,
        applied: Mapping[str, float] | None = None,
    ) -> None:
        # ``share``: this process's part of the ceilings (1/N for one of N shards);
        # ``applied``: the account's quotas in ``region`` (Service Quotas), under ``max_tps``.
        self.backend = backend
        self._share = share
        self.retry = retry
        self.stats = CallStats()
        self.network = backend.network
        self.reach = Reachability(
            backend.endpoint_name,
            unreachable_seconds,
            clock,
            first_contact=first_contact_seconds,
            ways_out=backend.ways_out,
        )
        self.latency: dict[str, LatencyWindow] = {}
        self._max_tps = max_tps
        self._region = region
        self._clock = clock
        self._rng = rng or random.Random()
        self._applied = applied
        self.regions: Regions | None = None  # several Regions: the stateless calls' routes
        self._stopping = stopping
        # Credentials: how often the backend reloaded them, and whether a call got through
        # since the last time.
        self._credentials_generation = 0
        self._ok_since_reload = False
        self._reloading = asyncio.Lock()
        self.limiters: dict[str, AdaptiveLimiter] = {}
        for api, rate in resolve_ceilings(max_tps, region, apis or [], applied).items():
            self.limiters[api] = AdaptiveLimiter(rate * share, clock=clock, name=api)

    def limiter(self, api: str) -> AdaptiveLimiter:
        limiter = self.limiters.get(api)
        if limiter is None:
            # An API no operation declared up front (collections): its default ceiling.
            (rate,) = resolve_ceilings(self._max_tps, self._region, [api], self._applied).values()
            limiter = self.limiters[api] = AdaptiveLimiter(
                rate * self._share, clock=self._clock, name=api
            )
        return limiter

    def _check_stopping(self, api: str) -> None:
        if self._stopping is not None and self._stopping.is_set():
            raise Interrupted(f"{api}: not sent again, the run is stopping")

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> CallOutcome:
        limiter: AdaptiveLimiter | Route = self.limiters.get(api) or self.limiter(api)
        route = None if self.regions is None else self.regions.route(api, images)
        if route is not None:
            limiter = route  # every Region's limiter of the API, behind one
        latency = self.latency.get(api)
        if latency is None:
            latency = self.latency[api] = LatencyWindow()
        upload = upload_bytes(images) / UPLOAD_FLOOR_BYTES_PER_SECOND if self.network else 0.0
        stats = self.stats
        clock = self._clock
        attempts = 0  # attempts that count towards max_attempts
        tries = 0
        unsure = 0
        seconds = 0.0
        while True:
            tries += 1
            if tries > 1:  # a retry: not once the run is stopping, even after the wait
                self._check_stopping(api)
                permit = await limiter.acquire()
                if self._stopping is not None and self._stopping.is_set():
                    limiter.on_error(permit)  # given back unused
                    self._check_stopping(api)
            else:
                permit = await limiter.acquire()
            stats.calls[api] += 1
            backend = self.backend if route is None else route.backend
            generation = self._credentials_generation
            sent = clock.now()
            deadline = latency.deadline() + upload
            try:
                if self.network:
                    async with asyncio.timeout(deadline):
                        result = await backend.call(api, params, images)
                else:
                    result = await backend.call(api, params, images)
            except (BackendError, TimeoutError) as exc:
                error = exc if isinstance(exc, BackendError) else _deadline(deadline)
                seconds += clock.now() - sent
                unsure += may_have_been_done(error)
                if error.kind == "throttle":
                    limiter.on_throttle(permit)
                    stats.throttles[api] += 1
                else:
                    limiter.on_error(permit)
                # The Region's failure, and another Region serves: no attempt used.
                moved = route is not None and route.failed(error)
                if error.kind == "credentials":
                    stats.credential_errors[api] += 1
                    if not moved:  # refused in every Region, or there is only one
                        await self._reload_credentials(error, generation)
                        continue  # refused before any work: no attempt used
                if error.connection is not None:
                    stats.connection_errors[api] += 1
                if error.connection == "connect":
                    # Nothing reached the service: no attempt used, but the endpoint's clock
                    # runs (and may stop the run).
                    self.reach.failed(f"{error.code}: {error.message}", sent)
                elif not moved:
                    attempts += 1
                if not moved and (not error.retryable or attempts >= self.retry.max_attempts):
                    stats.failures[api] += 1
                    return CallOutcome(None, error, tries, seconds, unsure)
                self._check_stopping(api)
                stats.retries[api] += 1
                pause = self.retry.delay(min(tries, 8), self._rng)
                seconds += pause
                await clock.sleep(pause)
                continue
            except BaseException:
                limiter.on_error(permit)
                raise
            elapsed = clock.now() - sent
            seconds += elapsed
            latency.add(elapsed)
            self.reach.ok()
            self._ok_since_reload = True
            limiter.on_success(permit)
            stats.ok[api] += 1
            return CallOutcome(result, None, tries, seconds, unsure)

    async def _reload_credentials(self, error: BackendError, generation: int) -> None:
        """After a refusal of the credentials used by a call sent at ``generation``: have
        the backend reload them, once; raise ``CredentialsRefused`` when reloaded ones were
        refused too before any call got through with them."""
        async with self._reloading:
            if generation != self._credentials_generation:
                return  # reloaded since that call was sent: try the new ones
            if self._credentials_generation and not self._ok_since_reload:
                raise CredentialsRefused(self.reach.name, error.code, error.message)
            try:
                reloaded = await self.backend.refresh_credentials()
            except Exception as exc:
                raise CredentialsRefused(
                    self.reach.name, error.code, f"{error.message}; reloading: {exc}"
                ) from exc
            if not reloaded:
                raise CredentialsRefused(self.reach.name, error.code, error.message)
            self._credentials_generation += 1
            self._ok_since_reload = False
            log.warning("credentials_reloaded", endpoint=self.reach.name, after=error.code)


def _deadline(seconds: float) -> BackendError:
    return BackendError(
        "Timeout",
        f"no answer within {seconds:.1f} s (5x the recent p99, and the upload's time)",
        "transient",
        connection="exchange",
    )
