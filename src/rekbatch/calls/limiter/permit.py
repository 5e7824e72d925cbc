"""A permit: one request's leave to go, and what the limiter learns from its answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["ok", "throttle", "error"]
"""How a request ended, for the limiter: accepted, refused for the rate, or anything else
(a failure, or a refusal within the service's background share)."""


@dataclass(eq=False, slots=True)
class Permit:
    sent_at: float
    epoch: int
    """The limiter's epoch when sent: replies to requests sent before the rate last changed
    never cut it again."""
    rate: float
    """The rate the limiter was set to when the request was sent."""
    booked: bool = False
    """Counted by the model of the service's bucket as spending one of its tokens."""
    probe: bool = False
    """Sent past the point where the model says the service's bucket is empty."""
    outcome: Outcome | None = None
    settled_at: float | None = None
    refused: bool = False
    """Throttled, whether or not the refusal counted for the rate."""

    @property
    def answered(self) -> bool:
        return self.outcome is not None
