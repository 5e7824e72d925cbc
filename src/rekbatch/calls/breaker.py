"""The failure breaker: stop a run whose failures are systemic instead of paying for them
object by object. Pure: fed each record's outcome, it says when to trip.

Two rules, whichever comes first:

- **Share**: more than ``max_failed_share`` of the last ``window`` records failed, judged
  once ``window`` records have been seen. The defaults, more than half of the last 1,000,
  are S3 Batch Operations' rule for failing a job (more than 50% of tasks failed, after
  at least 1,000); like Step Functions' tolerated failure percentage, the share can be set
  per job, and ``max_failed_share = 1`` turns the rule off.
- **Streak**: ``streak`` records in a row (at most ``window``) failed with the same code,
  none succeeding between them. A bucket rarely holds a run of unrelated failures; an
  expired credential, a missing permission or a broken service fails everything, and at
  20 records the run has paid for at most ``20 * max_attempts`` calls, not for the bucket.

Records skipped without a call are not fed to it. Failures that describe the object itself
(``OBJECT_CODES``: a format or size Rekognition refuses, an object deleted since it was
listed) count towards the share but do not make a streak: a folder of broken files, or one
deleted while the run lists it, is not a systemic fault.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

STREAK = 20
OBJECT_CODES = frozenset(
    {"InvalidImageFormatException", "ImageTooLargeException", "NoSuchKey", "404", "NotFound"}
)


@dataclass(frozen=True, slots=True)
class Trip:
    """Why the breaker tripped: the code most to blame and the counts, in one line."""

    code: str
    failed: int
    seen: int
    streak: bool

    def reason(self) -> str:
        if self.streak:
            return (
                f"{self.failed} records in a row failed with {self.code} and none succeeded "
                "between them; the run stopped rather than pay for the rest one by one"
            )
        return (
            f"{self.failed} of the last {self.seen} records failed (most often {self.code}); "
            "the run stopped rather than pay for the rest one by one"
        )


class FailureBreaker:
    def __init__(
        self, max_failed_share: float = 0.5, window: int = 1000, streak: int = STREAK
    ) -> None:
        if not 0.0 < max_failed_share <= 1.0:
            raise ValueError("max_failed_share must be in (0, 1]")
        if window < 1 or streak < 1:
            raise ValueError("window and streak must be at least 1")
        self.max_failed_share = max_failed_share
        self.window = window
        self.streak = min(streak, window)
        self._recent: deque[str | None] = deque(maxlen=window)  # None: ok, else the code
        self._codes: Counter[str] = Counter()  # the failures in ``_recent`` by code
        self._run_code: str | None = None
        self._run = 0
        self.tripped: Trip | None = None

    @property
    def failed(self) -> int:
        """Failed records among the last ``window``."""
        return self._codes.total()

    def record(self, code: str | None) -> Trip | None:
        """One record's outcome: None for ok, else its error code. Returns the trip once
        (and on every later record) when the run should stop."""
        if self.tripped is not None:
            return self.tripped
        if len(self._recent) == self.window:
            dropped = self._recent[0]
            if dropped is not None:
                self._codes[dropped] -= 1
                if not self._codes[dropped]:
                    del self._codes[dropped]
        self._recent.append(code)
        if code is not None:
            self._codes[code] += 1
        if code is None or code in OBJECT_CODES:
            self._run_code, self._run = None, 0
        elif code == self._run_code:
            self._run += 1
        else:
            self._run_code, self._run = code, 1
        if code is not None and self._run >= self.streak:
            self.tripped = Trip(code, self._run, self._run, streak=True)
        elif len(self._recent) == self.window and self.failed > self.max_failed_share * self.window:
            worst = self._codes.most_common(1)[0][0]
            self.tripped = Trip(worst, self.failed, self.window, streak=False)
        return self.tripped
