"""Whole runs on virtual time: a simulated Rekognition operation and a simulated client machine,
driven through ``Caller`` the way the engine's workers drive it.

- ``SimulatedService`` is a ``Backend``: one operation behind a token bucket at the quota
  (``burst`` seconds deep, starting full, checked when a request arrives; the quota may change
  on a schedule), that also refuses a share of requests whatever the rate (``throttle_rate``,
  a busy service), answers 500 after the latency (``error_rate``) or closes the connection
  without an answer (``drop_rate``). Accepted calls answer after a lognormal latency; refusals
  after ``throttle_latency`` (the project's fake answers them in 2 ms) or, if None, after the
  same lognormal latency.
- ``ClientCpu`` is the client's own processor: each request costs ``send_cost`` seconds
  before it leaves and ``receive_cost`` after its answer arrives, one at a time (one event
  loop), so the client has a top rate of its own. With ``busy`` (0 to 1) the process is off
  the processor that share of the time, in random slices as when other work shares the
  cores: sends leave late and answers wait, so the latency the client sees jitters.
- ``simulate`` runs ``consumers`` tasks that call through one ``Caller`` for ``duration``
  virtual seconds and returns what the service saw.

Everything is drawn from ``seed``: the same arguments give the same run.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from rekbatch.backends.base import ImageInput
from rekbatch.calls.caller import Caller
from rekbatch.calls.retry import RetryPolicy
from rekbatch.errors import BackendError
from tests.support.virtual_clock import VirtualClock

API = "DetectFaces"
Answer = Literal["ok", "quota", "throttle", "error", "drop"]


class ClientCpu:
    """The client's processor: work on it runs one piece at a time, and only while the
    process is on the processor (always, with ``busy`` 0)."""

    def __init__(
        self,
        clock: VirtualClock,
        *,
        busy: float = 0.0,
        slice_seconds: float = 0.01,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= busy < 1.0:
            raise ValueError("busy must be in [0, 1)")
        self._clock = clock
        self._busy = busy
        self._slice = slice_seconds
        self._rng = random.Random(seed)
        self._lock = asyncio.Lock()
        # On-processor intervals, generated as time goes: starts and ends, sorted.
        self._starts: list[float] = [0.0]
        self._ends: list[float] = [math.inf if busy == 0 else self._draw_on(0.0)]

    def _draw_on(self, start: float) -> float:
        return start + self._rng.expovariate(1.0 / self._slice)

    def _extend(self, until: float) -> None:
        mean_off = self._slice * self._busy / (1.0 - self._busy)
        while self._ends[-1] <= until:
            start = self._ends[-1] + self._rng.expovariate(1.0 / mean_off)
            self._starts.append(start)
            self._ends.append(self._draw_on(start))

    def _window(self, now: float) -> tuple[float, float]:
        """The on-processor interval holding ``now``, or the next one."""
        self._extend(now)
        i = bisect.bisect_right(self._starts, now) - 1
        if i >= 0 and now < self._ends[i]:
            return now, self._ends[i]
        return self._starts[i + 1], self._ends[i + 1]

    async def on(self) -> None:
        """Wait until the process is on the processor."""
        now = self._clock.now()
        start, _ = self._window(now)
        if start > now:
            await self._clock.sleep(start - now)

    async def use(self, seconds: float) -> None:
        async with self._lock:
            left = seconds
            while left > 1e-12:
                now = self._clock.now()
                start, end = self._window(now)
                if start > now:
                    await self._clock.sleep(start - now)
                    continue
                step = min(left, end - now)
                await self._clock.sleep(step)
                left -= step


@dataclass
class ServiceLog:
    """Every request as the service saw it: arrival time and answer."""

    arrivals: list[float] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def add(self, at: float, answer: Answer) -> None:
        self.arrivals.append(at)
        self.answers.append(answer)


class SimulatedService:
    """One Rekognition operation on virtual time (a ``Backend``)."""

    # The Backend protocol's attributes, written out rather than inherited from
    # InProcessBackend so that sim_ratelimit --src still runs older checkouts.
    network = False
    endpoint_name = "simulated Rekognition"
    ways_out = ""

    def __init__(
        self,
        clock: VirtualClock,
        *,
        quota: float | None,
        schedule: list[tuple[float, float]] | None = None,
        burst: float = 1.0,
        median: float = 0.15,
        sigma: float = 0.5,
        throttle_latency: float | None = None,
        throttle_rate: float = 0.0,
        error_rate: float = 0.0,
        drop_rate: float = 0.0,
        cpu: ClientCpu | None = None,
        server_cpu: ClientCpu | None = None,
        send_cost: float = 0.0,
        receive_cost: float = 0.0,
        server_cost: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.clock = clock
        self._quotas = [(0.0, quota), *(schedule or [])]
        self.burst = burst
        self._mu = math.log(median)
        self._sigma = sigma
        self.throttle_latency = throttle_latency
        self.throttle_rate = throttle_rate
        self.error_rate = error_rate
        self.drop_rate = drop_rate
        self.cpu = cpu
        self.server_cpu = server_cpu
        self.send_cost = send_cost
        self.receive_cost = receive_cost
        self.server_cost = server_cost
        self._rng = random.Random(seed)
        self._tokens = (quota or 0.0) * burst
        self._at = 0.0
        self.log = ServiceLog()

    def quota(self, t: float) -> float | None:
        current: float | None = None
        for at, value in self._quotas:
            if t >= at:
                current = value
        return current

    def _take_token(self, now: float) -> bool:
        changes = [at for at, _ in self._quotas if self._at < at <= now]
        for t in [*changes, now]:
            rate = self.quota(self._at)
            if rate is not None:
                self._tokens = min(rate * self.burst, self._tokens + (t - self._at) * rate)
            self._at = t
            new = self.quota(t)
            if new is not None:
                self._tokens = min(self._tokens, new * self.burst)
        if self.quota(now) is None:
            return True
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _latency(self) -> float:
        return self._rng.lognormvariate(self._mu, self._sigma)

    async def call(
        self, api: str, params: dict[str, Any], images: dict[str, ImageInput]
    ) -> dict[str, Any]:
        if self.cpu is not None:
            await self.cpu.use(self.send_cost)
        try:
            if self.server_cpu is not None:
                await self.server_cpu.on()
            try:
                return await self._serve()
            finally:
                if self.server_cpu is not None:
                    await self.server_cpu.on()
        finally:
            if self.cpu is not None:
                await self.cpu.use(self.receive_cost)

    async def _serve(self) -> dict[str, Any]:
        now = self.clock.now()
        rng = self._rng
        if self.drop_rate and rng.random() < self.drop_rate:
            self.log.add(now, "drop")
            await self.clock.sleep(0.001)
            raise BackendError(
                "ConnectionClosedError",
                "closed without an answer",
                "transient",
                connection="exchange",
            )
        if not self._take_token(now):
            self.log.add(now, "quota")
            await self.clock.sleep(self._refusal_latency())
            raise BackendError("ProvisionedThroughputExceededException", "over quota", "throttle")
        if self.throttle_rate and rng.random() < self.throttle_rate:
            self.log.add(now, "throttle")
            await self.clock.sleep(self._refusal_latency())
            raise BackendError("ThrottlingException", "slow down", "throttle")
        error = bool(self.error_rate) and rng.random() < self.error_rate
        self.log.add(now, "error" if error else "ok")
        await self.clock.sleep(self._latency())
        if self.server_cpu is not None and self.server_cost:
            await self.server_cpu.use(self.server_cost)  # the answer's work; refusals skip it
        if error:
            raise BackendError("InternalServerError", "internal error", "transient")
        return {"FaceDetails": []}

    def _refusal_latency(self) -> float:
        return self._latency() if self.throttle_latency is None else self.throttle_latency

    async def aclose(self) -> None:
        return None


@dataclass
class SimResult:
    duration: float
    ok: int
    refused: int
    """Refusals for the quota and the service's own (``throttle_rate``)."""
    quota_refused: int
    calls: int
    ok_per_second: float
    """Accepted calls per second after the warm-up."""
    available: float | None
    """The quota's requests over the run (None without a quota)."""
    quota_share: float | None
    """Accepted over available, the whole run."""
    steady_share: float | None
    """Accepted over available after the warm-up."""
    throttled_share: float
    recovery: float | None
    """Seconds from the last quota change to the end of the first second (from a tenth
    on, ending after the change) with accepted calls at 0.9 of the new quota (None without
    a schedule, or never)."""
    failed_calls: int
    limiter: dict[str, Any]
    trace: list[tuple[float, dict[str, Any]]]
    """(time, the limiter's snapshot) every ``trace_every`` seconds, if asked."""
    log: ServiceLog
    """Every request the service saw."""


WARM_UP = 5.0


def simulate(
    *,
    quota: float | None,
    ceiling: float,
    schedule: list[tuple[float, float]] | None = None,
    consumers: int = 64,
    duration: float = 60.0,
    seed: int = 7,
    median: float = 0.15,
    sigma: float = 0.5,
    throttle_latency: float | None = None,
    throttle_rate: float = 0.0,
    error_rate: float = 0.0,
    drop_rate: float = 0.0,
    send_cost: float = 0.0,
    receive_cost: float = 0.0,
    busy: float = 0.0,
    busy_slice: float = 0.01,
    server_busy: float = 0.0,
    server_cost: float = 0.0,
    max_attempts: int = 8,
    trace_every: float | None = None,
) -> SimResult:
    """One run through ``Caller`` (the engine's retry policy: ``max_attempts``, backoff
    capped at 2 s) against a ``SimulatedService``."""
    clock = VirtualClock()
    cpu = None
    if send_cost or receive_cost or busy:
        cpu = ClientCpu(clock, busy=busy, slice_seconds=busy_slice, seed=seed + 2)
    server_cpu = None
    if server_busy or server_cost:
        server_cpu = ClientCpu(clock, busy=server_busy, slice_seconds=busy_slice, seed=seed + 3)
    service = SimulatedService(
        clock,
        quota=quota,
        schedule=schedule,
        median=median,
        sigma=sigma,
        throttle_latency=throttle_latency,
        throttle_rate=throttle_rate,
        error_rate=error_rate,
        drop_rate=drop_rate,
        cpu=cpu,
        server_cpu=server_cpu,
        send_cost=send_cost,
        receive_cost=receive_cost,
        server_cost=server_cost,
        seed=seed,
    )
    caller = Caller(
        service,
        max_tps=ceiling,
        region="us-east-1",
        retry=RetryPolicy(max_attempts=max_attempts, cap=2.0),
        apis=[API],
        clock=clock,
        rng=random.Random(seed + 1),
    )
    failed = 0

    async def consumer() -> None:
        nonlocal failed
        while True:
            outcome = await caller.call(API, {}, {})
            if outcome.error is not None:
                failed += 1

    trace: list[tuple[float, dict[str, Any]]] = []

    async def tracer(every: float) -> None:
        while True:
            trace.append((clock.now(), caller.limiter(API).snapshot()))
            await clock.sleep(every)

    async def main() -> dict[str, Any]:
        tasks = [asyncio.create_task(consumer()) for _ in range(consumers)]
        if trace_every:
            tasks.append(asyncio.create_task(tracer(trace_every)))
        await clock.sleep(duration)
        snapshot = caller.limiters[API].snapshot()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return snapshot

    snapshot = clock.run(main())
    return _result(service, duration, failed, snapshot, trace)


def _result(
    service: SimulatedService,
    duration: float,
    failed: int,
    snapshot: dict[str, Any],
    trace: list[tuple[float, dict[str, Any]]],
) -> SimResult:
    log = service.log
    pairs = [(t, a) for t, a in zip(log.arrivals, log.answers, strict=True) if t < duration]
    ok = sum(1 for _, a in pairs if a == "ok")
    quota_refused = sum(1 for _, a in pairs if a == "quota")
    refused = quota_refused + sum(1 for _, a in pairs if a == "throttle")
    ok_warm = sum(1 for t, a in pairs if a == "ok" and t >= WARM_UP)
    available = steady = share = recovery = None
    if service.quota(0.0) is not None:
        available = _available(service, 0.0, duration)
        share = ok / available
        steady = ok_warm / _available(service, WARM_UP, duration)
    changes = service._quotas[1:]
    if changes:
        restored_at, restored = changes[-1]
        tenths = [0] * (int(duration * 10) + 1)
        for t, a in pairs:
            tenths[int(t * 10)] += a == "ok"
        for i in range(int(restored_at * 10), int(duration * 10)):
            if sum(tenths[i - 9 : i + 1]) >= 0.9 * restored:
                recovery = (i + 1) / 10 - restored_at
                break
    return SimResult(
        duration=duration,
        ok=ok,
        refused=refused,
        quota_refused=quota_refused,
        calls=len(pairs),
        ok_per_second=ok_warm / (duration - WARM_UP),
        available=available,
        quota_share=share,
        steady_share=steady,
        throttled_share=refused / max(1, len(pairs)),
        recovery=recovery,
        failed_calls=failed,
        limiter=snapshot,
        trace=trace,
        log=log,
    )


def _available(service: SimulatedService, start: float, end: float) -> float:
    """Requests the quota allows from ``start`` to ``end`` (refill only, no burst)."""
    total = 0.0
    edges = sorted({start, end, *(at for at, _ in service._quotas if start < at < end)})
    for a, b in itertools.pairwise(edges):
        total += (service.quota(a) or 0.0) * (b - a)
    return total
