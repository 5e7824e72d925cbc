"""One line each: a source's listing and a queue source, as a run's heartbeat describes them
(``rekbatch status`` and the progress display)."""

from __future__ import annotations

from typing import Any


def listing_line(uri: str, listing: dict[str, Any] | None) -> str | None:
    """``listing URI: N keys (R/s), P% ETA T`` from a run's listing stats of a source."""
    if not listing:
        return None
    text = f"listing {uri}: {listing['listed']} keys ({listing['per_second']:.0f}/s)"
    if listing.get("percent") is not None:
        text += f", {listing['percent']:.1f}%"
        if listing.get("eta_seconds") is not None:
            text += f" ETA {listing['eta_seconds']:.0f} s"
    elif listing.get("ranges"):
        text += f", ranges {listing['ranges_listed']}/{listing['ranges']}"
    return text


def queue_line(uri: str, q: dict[str, Any]) -> str:
    """``queue URI: backlog N (M in flight), oldest held A s; received R, ...``"""
    backlog = "backlog unknown" if q.get("backlog") is None else f"backlog {q['backlog']}"
    if q.get("in_flight") is not None:
        backlog += f" ({q['in_flight']} in flight)"
    if q.get("backlog_age_seconds") is not None:
        backlog += f" as of {q['backlog_age_seconds']:.0f} s ago"
    parts = [backlog]
    if q.get("oldest_held_age_seconds") is not None:
        parts.append(f"oldest message in hand {q['oldest_held_age_seconds']:.0f} s old")
    if q.get("lag_seconds") is not None:
        parts.append(f"last received {q['lag_seconds']:.0f} s after it was sent")
    counts = (
        f"received {q.get('received', 0)}, deleted {q.get('deleted', 0)}, "
        f"left for redrive {q.get('failed_messages', 0)}"
    )
    return f"queue {uri}: {', '.join(parts)}; {counts}"
