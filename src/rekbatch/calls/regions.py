"""Rekognition in several Regions at once: a limiter per (Region, API), and a dispatcher that
hands each call to the Region whose limiter grants a permit first.

Rekognition's quotas are per account, Region and API, so N Regions give N quotas. The
stateless APIs (``SPREAD_APIS``: the detect operations, CompareFaces, RecognizeCelebrities,
DetectProtectiveEquipment) are spread over ``aws.regions``; face collections live in one
Region, so their APIs stay in the home Region (``aws.region``) and never come here.

Per API, each Region is a *lane*: its own ``AdaptiveLimiter`` (the home lane shares the
caller's) and its Region's backend. A lane's *pump* takes a permit from its limiter
whenever a call is waiting that it may serve, and gives it to the first such call; with no
one waiting it holds that one permit for the next. So every Region runs at its own quota,
and a call waits only for the fastest Region that can serve it. A call may be bound to some
Regions (``Regions.allowed``): to its bucket's Region when the image cannot go as bytes
(``image_mode = "s3"``, ``rekognition_region = "bucket"``, over 5 MB).

An image whose bucket is not in the calling Region goes as bytes (``RegionBackend``): read
once per object (``ObjectBytes``) and shared by its operations and retries; the bucket's own
Region gets the S3Object reference.

A Region that stops answering leaves the rotation (``Lane.failed``): ``DOWN_AFTER`` failures
in a row that are the Region's rather than the request's (no connection, timeouts, 5xx,
refused access: ``region_failure``). Its pump stops taking permits; after ``RETRY_FIRST``
seconds (doubling up to ``RETRY_MAX``) one probe call goes there, and a probe that is
answered puts it back. The call that met the failure goes to another Region without using
an attempt (``Route.failed``), so one Region down never fails a record nor stops the run;
only when every Region a call may use is out does it wait for a probe, and the caller's
reachability clock stops the run as for one Region.

``Route`` has the limiter's interface (``acquire``, ``on_success``, ``on_throttle``,
``on_error``), so ``Caller`` drives one the way it drives an ``AdaptiveLimiter`` and sends
the request with ``route.backend``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from rekbatch.backends.base import Backend, ImageInput
from rekbatch.calls.limiter import AdaptiveLimiter, Permit
from rekbatch.clock import MONOTONIC, Clock
from rekbatch.errors import BackendError

log = structlog.get_logger("rekbatch")

#: The APIs that keep no state in the Region: any Region can answer any call.
SPREAD_APIS = frozenset(
    {
        "DetectFaces",
        "DetectLabels",
        "DetectText",
        "DetectModerationLabels",
        "CompareFaces",
        "RecognizeCelebrities",
        "DetectProtectiveEquipment",
    }
)

DOWN_AFTER = 5  # the Region's failures in a row, with nothing answered between them
RETRY_FIRST = 10.0  # seconds out of the rotation before the first probe
RETRY_MAX = 300.0
MAX_BYTES = 5 * 1024 * 1024  # the largest image Rekognition takes as bytes

# Refusals that say the Region will not serve this account (an SCP denying the Region, a
# Region not enabled, an API it does not offer), not that the request is wrong.
REFUSING_CODES = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "InvalidClientTokenId",
        "SubscriptionRequiredException",
        "OptInRequired",
        "UnknownOperationException",
        "AuthFailure",
    }
)


class ImageReadError(BackendError):
    """Reading an object's bytes for another Region failed: the object's problem, not the
    Region's."""


def region_failure(error: BackendError) -> bool:
    """Whether ``error`` is the Region's doing: it would have failed whatever the request."""
    if isinstance(error, ImageReadError) or error.kind == "throttle":
        return False
    return error.code in REFUSING_CODES or error.kind == "transient"


@dataclass
class LaneStats:
    calls: int = 0
    ok: int = 0
    throttles: int = 0
    errors: int = 0
    moved: int = 0  # calls the Region failed that went to another Region


class Lane:
    """One API in one Region: its limiter, its backend, whether it is in the rotation."""

    def __init__(
        self, region: str, api: str, limiter: AdaptiveLimiter, backend: Backend, clock: Clock
    ) -> None:
        self.region = region
        self.api = api
        self.limiter = limiter
        self.backend = backend
        self.stats = LaneStats()
        self._clock = clock
        self.failures = 0  # the Region's failures in a row
        self.out_until: float | None = None  # out of the rotation; a probe is due then
        self.retry_after = RETRY_FIRST
        self.probe: Permit | None = None  # the one call that tells whether it is back
        self.held: Permit | None = None
        self.wake = asyncio.Event()

    @property
    def serving(self) -> bool:
        return self.out_until is None

    def answered(self) -> None:
        """The Region answered (a result, a throttle, a refusal of the request itself)."""
        self.failures = 0
        if self.out_until is not None:
            log.info("region_back", region=self.region, api=self.api)
            self.out_until = None
            self.retry_after = RETRY_FIRST
        self.probe = None
        self.wake.set()

    def probe_unsettled(self) -> None:
        """The probe ended without telling (its caller gave up): another one later."""
        self.probe = None
        if self.out_until is not None:
            self.out_until = self._clock.now() + self.retry_after
        self.wake.set()

    def probe_failed(self) -> None:
        """Still down: wait longer before the next probe."""
        self.probe = None
        self.retry_after = min(RETRY_MAX, self.retry_after * 2)
        self.out_until = self._clock.now() + self.retry_after
        self.wake.set()

    def failed(self, error: BackendError) -> None:
        """A failure that is the Region's; enough in a row take it out of the rotation."""
        self.failures += 1
        now = self._clock.now()
        if self.out_until is None and self.failures >= DOWN_AFTER:
            self.out_until = now + self.retry_after
            if self.held is not None:  # no call goes there with it now
                self.limiter.on_error(self.held)
                self.held = None
            log.warning(
                "region_left_rotation",
                region=self.region,
                api=self.api,
                error=f"{error.code}: {error.message}"[:300],
                failures=self.failures,
                retry_in=self.retry_after,
            )
            self.wake.set()


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[tuple[Lane, Permit]]
    allowed: frozenset[str] | None

    def takes(self, region: str) -> bool:
        return not self.future.done() and (self.allowed is None or region in self.allowed)


class Dispatch:
    """The lanes of one API and the calls waiting for a permit from any of them."""

    def __init__(self, api: str, lanes: list[Lane], clock: Clock) -> None:
        self.api = api
        self.lanes = lanes
        self._clock = clock
        self._waiters: deque[_Waiter] = deque()
        self._pumps: list[asyncio.Task[None]] = []
        self._broken: BaseException | None = None

    def _start(self) -> None:
        if not self._pumps:
            for lane in self.lanes:
                task = asyncio.create_task(self._pump(lane), name=f"pump-{self.api}-{lane.region}")
                task.add_done_callback(self._pump_ended)
                self._pumps.append(task)

    def _pump_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a bug: every waiting call gets it rather than waiting forever
            self._broken = error
            for waiter in self._waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(error)

    def _wanted(self, region: str) -> bool:
        while self._waiters and self._waiters[0].future.done():
            self._waiters.popleft()
        return any(w.takes(region) for w in self._waiters)

    def _hand(self, lane: Lane, permit: Permit) -> bool:
        for waiter in self._waiters:
            if waiter.takes(lane.region):
                waiter.future.set_result((lane, permit))
                return True
        return False

    async def _pump(self, lane: Lane) -> None:
        clock = self._clock
        while True:
            lane.wake.clear()
            if lane.out_until is not None:
                if lane.probe is not None:
                    await lane.wake.wait()  # the probe's answer
                    continue
                wait = lane.out_until - clock.now()
                if wait > 0:
                    await clock.sleep(wait)
                    continue
            if lane.held is not None or not self._wanted(lane.region):
                await lane.wake.wait()
                continue
            permit = await lane.limiter.acquire()
            if lane.out_until is not None:
                if lane.probe is not None or clock.now() < lane.out_until:
                    lane.limiter.on_error(permit)  # left the rotation meanwhile: unused
                    continue
                lane.probe = permit
            if not self._hand(lane, permit):
                lane.held = permit

    async def take(self, allowed: frozenset[str] | None) -> tuple[Lane, Permit]:
        """A permit from the first lane among ``allowed`` (None: any) to grant one."""
        if self._broken is not None:
            raise self._broken
        for lane in self.lanes:
            held = lane.held
            if held is None or not (lane.serving or held is lane.probe):
                continue
            if allowed is None or lane.region in allowed:
                lane.held = None
                lane.wake.set()
                return lane, held
        self._start()
        future: asyncio.Future[tuple[Lane, Permit]] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(future, allowed)
        self._waiters.append(waiter)
        for lane in self.lanes:
            if allowed is None or lane.region in allowed:
                lane.wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                lane, permit = future.result()
                self._give_back(lane, permit)
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise

    def _give_back(self, lane: Lane, permit: Permit) -> None:
        """A permit handed to a call that had gone: to the next call, or back unused."""
        if permit is lane.probe:
            lane.limiter.on_error(permit)
            lane.probe_unsettled()
        elif not self._hand(lane, permit):
            if lane.held is None:
                lane.held = permit
            else:
                lane.limiter.on_error(permit)

    def serving_other(self, lane: Lane, allowed: frozenset[str] | None) -> bool:
        return any(
            other is not lane and other.serving and (allowed is None or other.region in allowed)
            for other in self.lanes
        )

    async def aclose(self) -> None:
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._pumps = []
        for lane in self.lanes:
            if lane.held is not None:
                lane.limiter.on_error(lane.held)
                lane.held = None


class Route:
    """One call's way through a ``Dispatch``, with the limiter's interface: ``acquire``
    takes a permit from whichever allowed Region grants one first; ``backend`` is then that
    Region's, and the outcome settles that Region's limiter."""

    __slots__ = ("_allowed", "_dispatch", "_probe", "_resolve", "_resolved", "lane", "moves")

    def __init__(
        self,
        dispatch: Dispatch,
        resolve: Callable[[], Awaitable[frozenset[str] | None]],
    ) -> None:
        self._dispatch = dispatch
        self._resolve = resolve
        self._resolved = False
        self._allowed: frozenset[str] | None = None
        self.lane: Lane | None = None
        self._probe = False  # the permit in hand is its Region's probe
        self.moves = 0

    async def acquire(self) -> Permit:
        if not self._resolved:
            self._allowed = await self._resolve()
            self._resolved = True
        lane, permit = await self._dispatch.take(self._allowed)
        self.lane = lane
        self._probe = permit is lane.probe
        lane.stats.calls += 1
        return permit

    def _lane(self) -> Lane:
        assert self.lane is not None, "settled before acquire"
        return self.lane

    @property
    def backend(self) -> Backend:
        return self._lane().backend

    @property
    def region(self) -> str:
        return self._lane().region

    def on_success(self, permit: Permit) -> None:
        lane = self._lane()
        lane.limiter.on_success(permit)
        lane.stats.ok += 1
        lane.answered()

    def on_throttle(self, permit: Permit) -> None:
        lane = self._lane()
        lane.limiter.on_throttle(permit)
        lane.stats.throttles += 1
        lane.answered()

    def on_error(self, permit: Permit) -> None:
        lane = self._lane()
        lane.limiter.on_error(permit)
        lane.stats.errors += 1
        if self._probe:  # ``failed`` tells more, unless the call was given up
            lane.probe_unsettled()

    def failed(self, error: BackendError) -> bool:
        """After the permit is settled: whether the call goes to another Region without
        using an attempt (the failure was the Region's and another one serves)."""
        lane = self._lane()
        if error.kind == "throttle":
            return False
        if not region_failure(error):
            lane.answered()
            return False
        if self._probe:
            lane.probe_failed()
        else:
            lane.failed(error)
        if self.moves >= len(self._dispatch.lanes):
            return False  # every Region failed it: the caller's own rules decide
        if not self._dispatch.serving_other(lane, self._allowed):
            return False
        self.moves += 1
        lane.stats.moved += 1
        return True


class BucketRegions:
    """Which Region each bucket is in, asked once per bucket (``lookup``; None: the home
    Region, as S3 says nothing of a bucket it cannot locate)."""

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[str | None]] | None,
        home: str,
        known: Mapping[str, str] | None = None,
    ) -> None:
        self._lookup = lookup
        self._home = home
        self._found: dict[str, asyncio.Future[str]] = {}
        self._known = dict(known or {})

    def learn(self, known: Mapping[str, str]) -> None:
        self._known.update(known)

    async def region(self, bucket: str) -> str:
        known = self._known.get(bucket)
        if known is not None:
            return known
        if self._lookup is None:
            return self._home
        future = self._found.get(bucket)
        if future is None:
            future = self._found[bucket] = asyncio.ensure_future(self._ask(bucket))
        return await asyncio.shield(future)

    async def _ask(self, bucket: str) -> str:
        assert self._lookup is not None
        try:
            where = await self._lookup(bucket)
        except Exception as exc:  # unknown: the home Region, where the run started
            log.warning("bucket_region_unknown", bucket=bucket, error=str(exc)[:200])
            where = None
        self._known[bucket] = where or self._home
        return self._known[bucket]


class RegionBackend:
    """A Region's backend for stateless calls: an image whose bucket is in another Region
    goes as its bytes (read once per object), one in this Region as its S3 reference."""

    def __init__(self, region: str, backend: Backend, buckets: BucketRegions) -> None:
        self.region = region
        self._backend = backend
        self._buckets = buckets
        self.bytes_sent = 0  # image bytes sent here from buckets in other Regions
        self.reads = 0  # objects read to be sent here (GETs)

    @property
    def network(self) -> bool:
        return self._backend.network

    @property
    def endpoint_name(self) -> str:
        return self._backend.endpoint_name

    @property
    def ways_out(self) -> str:
        return self._backend.ways_out

    async def refresh_credentials(self) -> bool:
        return await self._backend.refresh_credentials()

    def _counted_read(self) -> None:
        self.reads += 1

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        ready = images
        for name, image in images.items():
            if image.data is not None or image.bucket is None or image.fetch is None:
                continue
            if await self._buckets.region(image.bucket) == self.region:
                continue
            try:
                data = await image.fetch.get(self._counted_read)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise _read_error(image, self.region, exc) from exc
            ready = {**ready, name: ImageInput(data=data)}
            self.bytes_sent += len(data)
        return await self._backend.call(api, params, ready)

    async def aclose(self) -> None:
        """The Region's client belongs to the run, which closes it."""


def _read_error(image: ImageInput, region: str, exc: BaseException) -> ImageReadError:
    from rekbatch.calls.classify import failure_of

    failure = failure_of(exc)
    where = f"s3://{image.bucket}/{image.key}"
    if failure is None:
        return ImageReadError(
            type(exc).__name__, f"reading {where} to send it to {region}: {exc}", "permanent"
        )
    return ImageReadError(
        failure.code,
        f"reading {where} to send it to {region}: {failure.message}",
        failure.kind,  # no connection stage: S3's, not Rekognition's endpoint
    )


class Regions:
    """The run's Regions: per spread API a ``Dispatch`` over every calling Region's lane.

    ``backends``: Region -> its backend (the home one included when it is a calling Region);
    ``limiter``: the limiter of (Region, API), called once per lane; ``pin``: an S3
    reference always goes to its bucket's Region (``image_mode = "s3"``, ``rekognition_region
    = "bucket"``), else only one that cannot go as bytes does."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        home: str,
        limiter: Callable[[str, str], AdaptiveLimiter],
        buckets: BucketRegions,
        pin: bool = False,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.home = home
        self.names = list(backends)
        self.senders = {r: RegionBackend(r, b, buckets) for r, b in backends.items()}
        self._limiter = limiter
        self._buckets = buckets
        self._pin = pin
        self._clock = clock
        self._dispatches: dict[str, Dispatch] = {}

    def dispatch(self, api: str) -> Dispatch:
        found = self._dispatches.get(api)
        if found is None:
            lanes = [
                Lane(region, api, self._limiter(region, api), sender, self._clock)
                for region, sender in self.senders.items()
            ]
            found = self._dispatches[api] = Dispatch(api, lanes, self._clock)
        return found

    def route(self, api: str, images: dict[str, ImageInput]) -> Route | None:
        """The way for one call of ``api``; None for an API that stays home."""
        if api not in SPREAD_APIS:
            return None
        return Route(self.dispatch(api), lambda: self.allowed(images))

    async def allowed(self, images: Mapping[str, ImageInput]) -> frozenset[str] | None:
        """The Regions a call with ``images`` may go to (None: any): an S3 reference that
        may not or cannot go as bytes binds it to its bucket's Region, when that is one of
        the calling Regions."""
        allowed: frozenset[str] | None = None
        for image in images.values():
            if image.data is not None or image.bucket is None:
                continue
            bytes_ok = image.fetch is not None and image.fetch.size <= MAX_BYTES
            if bytes_ok and not self._pin:
                continue
            where = await self._buckets.region(image.bucket)
            if where not in self.senders:
                continue  # no calling Region reads it: bytes (or its own error) anywhere
            allowed = frozenset({where}) if allowed is None else allowed & {where}
        return allowed

    def snapshot(self, elapsed: float) -> dict[str, dict[str, Any]]:
        """Per Region: calls, answers, throttles, rate, and which APIs are out of the
        rotation, over the spread APIs."""
        out: dict[str, dict[str, Any]] = {}
        for region, sender in self.senders.items():
            lanes = [
                lane
                for dispatch in self._dispatches.values()
                for lane in dispatch.lanes
                if lane.region == region
            ]
            calls = sum(lane.stats.calls for lane in lanes)
            out[region] = {
                "calls": calls,
                "ok": sum(lane.stats.ok for lane in lanes),
                "throttles": sum(lane.stats.throttles for lane in lanes),
                "errors": sum(lane.stats.errors for lane in lanes),
                "moved": sum(lane.stats.moved for lane in lanes),
                "calls_per_second": round(calls / elapsed, 2) if elapsed > 0 else 0.0,
                "out_of_rotation": sorted(lane.api for lane in lanes if not lane.serving),
                "ceilings": {lane.api: lane.limiter.ceiling for lane in lanes},
                "bytes_received_from_other_regions": sender.bytes_sent,
                "objects_read": sender.reads,
            }
        return out

    async def aclose(self) -> None:
        for dispatch in self._dispatches.values():
            await dispatch.aclose()


def region_totals(
    regions: Regions | None,
    home: str,
    calls: Mapping[str, int],
    ok: Mapping[str, int],
    throttles: Mapping[str, int],
    elapsed: float,
) -> dict[str, dict[str, Any]]:
    """Per Region: the dispatcher's counts, and the calls that stayed home (every API that
    is not spread, or all of them with one Region) added to the home Region's."""
    out = regions.snapshot(elapsed) if regions is not None else {}

    def stayed(counter: Mapping[str, int]) -> int:
        return sum(n for api, n in counter.items() if regions is None or api not in SPREAD_APIS)

    mine = out.setdefault(
        home, {"calls": 0, "ok": 0, "throttles": 0, "errors": 0, "out_of_rotation": []}
    )
    home_calls, home_ok, home_throttles = stayed(calls), stayed(ok), stayed(throttles)
    mine["calls"] += home_calls
    mine["ok"] += home_ok
    mine["throttles"] += home_throttles
    mine["errors"] += max(0, home_calls - home_ok - home_throttles)  # in flight count too
    for one in out.values():
        one["calls_per_second"] = round(one["calls"] / elapsed, 2) if elapsed > 0 else 0.0
    return out
