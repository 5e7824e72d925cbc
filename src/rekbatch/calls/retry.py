"""How long to wait before the next attempt, and whether an endpoint is down.

``RetryPolicy`` is capped exponential backoff with jitter (AWS "full jitter" by default,
"decorrelated jitter" on request): ``delay(attempt, rng)`` is the pause after the
``attempt``-th failed attempt (1-based), ``should_retry(kind, attempt)`` whether to make
another one. Which failures are which is ``rekbatch.calls.classify``.

``Reachability`` tells an endpoint that is down from one that was never reached;
``while_reachable`` repeats a request that is safe to repeat (an S3 read, an SQS receive)
after each failed connection until that endpoint is down.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from rekbatch.calls.classify import failure_of
from rekbatch.clock import Clock
from rekbatch.errors import EndpointNeverReached, EndpointUnreachable, ErrorKind

Jitter = Literal["full", "decorrelated"]
T = TypeVar("T")

# How long an endpoint no call of the run has reached may refuse connections before the run
# stops with a setup error: a few backoffs, and well under ``unreachable_seconds``.
FIRST_CONTACT_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter.

    - ``max_attempts``: attempts in all, the first included (so at most ``max_attempts - 1``
      retries); 1 means never retry.
    - ``base``: the first backoff's scale, in seconds; ``cap``: no pause is longer.
    - ``jitter``: ``full`` draws the pause uniformly in ``[0, min(cap, base * 2**attempt)]``;
      ``decorrelated`` draws it uniformly in ``[base, min(cap, 3 * base * 2**(attempt - 1))]``
      (AWS's decorrelated jitter, with the previous pause taken at its bound so that the
      policy needs no state between attempts).
    """

    max_attempts: int = 8
    base: float = 0.05
    cap: float = 20.0
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base <= 0 or self.cap < self.base:
            raise ValueError("need 0 < base <= cap")

    def ceiling(self, attempt: int) -> float:
        """The longest pause after the ``attempt``-th failed attempt."""
        exponent = min(max(attempt, 1), 60)
        return min(self.cap, self.base * 2.0**exponent)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after the ``attempt``-th failed attempt (1-based)."""
        if self.jitter == "full":
            return rng.uniform(0.0, self.ceiling(attempt))
        previous = self.base if attempt <= 1 else self.ceiling(attempt - 1)
        return rng.uniform(self.base, min(self.cap, 3.0 * previous))

    def should_retry(self, kind: ErrorKind, attempt: int) -> bool:
        """Whether to make another attempt after the ``attempt``-th one failed with ``kind``."""
        return kind in ("throttle", "transient") and attempt < self.max_attempts


class Reachability:
    """Is an endpoint down? Pure, on a clock; fed only failures to connect (nothing reached
    the endpoint), each with the time its attempt began.

    - Down: no call has succeeded for ``limit`` seconds while connections kept failing;
      one success anywhere ends it. ``EndpointUnreachable`` (the run stops, resumable).
    - Never reached: no call has succeeded yet in this run and connections have failed for
      ``first_contact`` seconds (default ``FIRST_CONTACT_SECONDS``). ``EndpointNeverReached``
      names the endpoint and ``ways_out``: a wrong region, URL or network is far likelier
      than an outage, and waiting ``limit`` seconds for it would be silence.
    """

    def __init__(
        self,
        name: str,
        limit: float,
        clock: Clock,
        *,
        first_contact: float | None = None,
        ways_out: str = "",
    ) -> None:
        self.name = name
        self.limit = limit
        self.first_contact = FIRST_CONTACT_SECONDS if first_contact is None else first_contact
        self.ways_out = ways_out
        self._clock = clock
        self._failing_since: float | None = None
        self.reached = False
        self.failures = 0

    def ok(self) -> None:
        self._failing_since = None
        self.reached = True

    def failed(self, error: str, began: float | None = None) -> None:
        """A failure to connect, of an attempt that began at ``began`` (default: now);
        raises once the endpoint counts as never reached or down."""
        now = self._clock.now()
        self.failures += 1
        if self._failing_since is None:
            self._failing_since = now if began is None else min(began, now)
        down = now - self._failing_since
        if not self.reached and down >= self.first_contact:
            raise EndpointNeverReached(self.name, down, error, self.ways_out)
        if down >= self.limit:
            raise EndpointUnreachable(self.name, down, error)

    @property
    def down_for(self) -> float:
        since = self._failing_since
        return 0.0 if since is None else self._clock.now() - since


async def while_reachable(
    request: Callable[[], Awaitable[T]],
    reach: Reachability,
    clock: Clock,
    retry: RetryPolicy,
    rng: random.Random,
) -> T:
    """``request()``, again after each failed connection until ``reach`` says the endpoint
    is down (it raises then). Only for requests that are free to repeat: any other failure
    is raised at once."""
    tries = 0
    while True:
        tries += 1
        began = clock.now()
        try:
            result = await request()
        except Exception as exc:
            classified = failure_of(exc)
            if classified is None or classified.connection is None:
                raise
            reach.failed(f"{classified.code}: {classified.message}", began)
            await asyncio.sleep(retry.delay(min(tries, 8), rng))
            continue
        reach.ok()
        return result
