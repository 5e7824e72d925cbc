"""Which failed Rekognition calls to retry, and how long to wait before the next attempt.

``classify`` maps an error code and HTTP status to an ``ErrorKind``:

- ``throttle``: the service refused for rate (the rate limiter slows down, then retry).
  ``ProvisionedThroughputExceededException`` (over the account's TPS quota),
  ``ThrottlingException`` (the service is busy), and the generic AWS throttling codes
  (``Throttling``, ``ThrottledException``, ``TooManyRequestsException``,
  ``RequestLimitExceeded``, ``RequestThrottled``, ``SlowDown``...), and HTTP 429.
  ``LimitExceededException`` is Rekognition's "too many concurrent jobs" (stored video,
  stream processors, media analysis); it clears when load drops, so it is treated as a
  throttle too.
- ``transient``: worth retrying as is: ``InternalServerError``, ``ServiceUnavailable``, any 5xx,
  timeouts, dropped or reset connections (``code`` from the transport, or no status at all).
- ``permanent``: the request itself is wrong and would fail again: ``InvalidImageFormatException``,
  ``ImageTooLargeException``, ``InvalidParameterException``, ``InvalidS3ObjectException``,
  ``AccessDeniedException``, ``ResourceNotFoundException`` and any other 4xx.

``RetryPolicy`` is capped exponential backoff with jitter (AWS "full jitter" by default,
"decorrelated jitter" on request): ``delay(attempt, rng)`` is the pause after the
``attempt``-th failed attempt (1-based), ``should_retry(kind, attempt)`` whether to make
another one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from rekbatch.clock import Clock
from rekbatch.errors import EndpointUnreachable, ErrorKind

THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "ThrottlingError",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "BandwidthLimitExceeded",
        "SlowDown",
        "LimitExceededException",
        "EC2ThrottledException",
        "PriorRequestNotComplete",
    }
)

TRANSIENT_CODES = frozenset(
    {
        "InternalServerError",
        "InternalServerErrorException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "ServiceException",
        "RequestTimeout",
        "RequestTimeoutException",
        "Timeout",
        "TimeoutError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ConnectionError",
        "ConnectionClosedError",
        "EndpointConnectionError",
        "ConnectionResetError",
        "ConnectionAbortedError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "IncompleteRead",
        "ResponseStreamingError",
        "HumanLoopQuotaExceededException",
    }
)

PERMANENT_CODES = frozenset(
    {
        "InvalidImageFormatException",
        "ImageTooLargeException",
        "InvalidParameterException",
        "InvalidS3ObjectException",
        "AccessDeniedException",
        "ResourceNotFoundException",
        "ResourceAlreadyExistsException",
        "ResourceInUseException",
        "InvalidPaginationTokenException",
        "ValidationException",
        "SerializationException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "UnknownOperationException",
        "ExpiredTokenException",
    }
)

_TRANSIENT_HINTS = ("timeout", "timedout", "connection", "reset", "disconnect", "broken pipe")


def classify(code: str | None, http_status: int | None) -> ErrorKind:
    """The kind of a failed call, from its error code and HTTP status (either may be None)."""
    name = (code or "").strip()
    if name in THROTTLE_CODES or http_status == 429:
        return "throttle"
    if name in TRANSIENT_CODES:
        return "transient"
    if name in PERMANENT_CODES:
        return "permanent"
    lowered = name.lower()
    if "throttl" in lowered or "toomanyrequests" in lowered:
        return "throttle"
    if any(hint in lowered for hint in _TRANSIENT_HINTS):
        return "transient"
    if http_status is None:
        # No HTTP answer at all: the connection failed, timed out or was reset.
        return "transient"
    if http_status >= 500:
        return "transient"
    if http_status == 408:
        return "transient"
    return "permanent"


Jitter = Literal["full", "decorrelated"]


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
        return kind != "permanent" and attempt < self.max_attempts


# Failures of the connection itself (no answer came back): they say nothing about the request
# and are retried for as long as the endpoint is not down, without using up attempts.
CONNECTION_CODES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "HTTPClientError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ConnectionError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "ServerDisconnectedError",
        "ClientOSError",
        "TimeoutError",
        "Timeout",
    }
)


def is_connection_failure(code: str) -> bool:
    return code in CONNECTION_CODES


class Reachability:
    """Is an endpoint down? Down means no call has succeeded for ``limit`` seconds while
    calls kept failing on the connection; one success anywhere ends it. Pure, on a clock."""

    def __init__(self, name: str, limit: float, clock: Clock) -> None:
        self.name = name
        self.limit = limit
        self._clock = clock
        self._failing_since: float | None = None
        self.failures = 0

    def ok(self) -> None:
        self._failing_since = None

    def failed(self, error: str) -> None:
        """A connection failure; raises ``EndpointUnreachable`` once the endpoint has been
        down for ``limit`` seconds."""
        now = self._clock.now()
        self.failures += 1
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.limit:
            raise EndpointUnreachable(self.name, now - self._failing_since, error)

    @property
    def down_for(self) -> float:
        since = self._failing_since
        return 0.0 if since is None else self._clock.now() - since
