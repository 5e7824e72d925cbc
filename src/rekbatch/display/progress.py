"""The live progress display on a terminal: rich, on stderr, above which log lines scroll.

Objects (listed, done) and records (one per object and operation: ok, failed, skipped) are
counted on separate lines, since they are different units. The rate and the ETA come from
the last ``window`` seconds; no ETA is shown before ``warmup`` seconds of work, when one
would be a guess.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rekbatch.display.lines import listing_line, queue_line

if TYPE_CHECKING:
    from rekbatch.engine import Job


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


class ProgressView:
    """What the display shows, from a run's live counters (``Job.live_stats()``); pure."""

    def __init__(self, window: float = 10.0, warmup: float = 3.0) -> None:
        self._samples: deque[tuple[float, int, dict[str, int]]] = deque()
        self._window = window
        self._warmup = warmup
        self._first: float | None = None

    def render(self, stats: dict[str, Any], now: float) -> Group:
        calls: dict[str, int] = dict(stats.get("calls", {}))
        done = int(stats.get("objects_done", 0))
        listed = int(stats.get("listed", 0))
        records = stats.get("records", {})
        if self._first is None:
            self._first = now
        self._samples.append((now, done, calls))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        first_t, first_done, first_calls = self._samples[0]
        span = max(now - first_t, 1e-9)
        objects_rate = (done - first_done) / span
        listing = "" if stats.get("listing_complete") else " (listing…)"
        objects = Table.grid(padding=(0, 2))
        objects.add_row(
            Text("objects", style="bold"),
            Text(f"listed {listed}{listing}"),
            Text(f"done {done}"),
            Text(f"copies {stats.get('deduplicated', 0)}"),
        )
        objects.add_row(
            Text("records", style="bold"),
            Text(f"ok {records.get('ok', 0)}", style="green"),
            Text(f"failed {records.get('failed', 0)}", style="red"),
            Text(f"skipped {records.get('skipped', 0)}", style="yellow"),
            *([Text(f"removed {records['removed']}")] if records.get("removed") else []),
        )
        for uri, listing in stats.get("listing", {}).items():
            line = listing_line(uri, listing)
            if line and not listing.get("done"):
                objects.add_row(Text("listing", style="bold"), Text(line.split(": ", 1)[1]))
        for uri, queue in stats.get("queues", {}).items():
            line = queue_line(uri, queue).split(": ", 1)[1]
            objects.add_row(Text("queue", style="bold"), Text(line))
        ops = Table(box=None, padding=(0, 2), show_edge=False)
        for column in ("API", "calls/s", "limit/s", "in flight", "throttles", "retries"):
            ops.add_column(column, justify="right" if column != "API" else "left")
        for api, limiter in stats.get("limiters", {}).items():
            rate = (calls.get(api, 0) - first_calls.get(api, 0)) / span
            ops.add_row(
                api,
                f"{rate:.1f}",
                f"{limiter['rate']:.1f}",
                str(limiter["in_flight"]),
                str(stats.get("throttles", {}).get(api, 0)),
                str(stats.get("retries", {}).get(api, 0)),
            )
        if not stats.get("listing_complete"):
            eta = "after listing"
        elif listed <= done:
            eta = _clock(0)
        elif now - self._first < self._warmup or objects_rate <= 0:
            eta = "estimating…"
        else:
            eta = _clock((listed - done) / objects_rate)
        foot = Text(f"{objects_rate:.1f} objects/s · ETA {eta}", style="dim")
        return Group(objects, ops, foot)


async def show_progress(job: Job, console: Console | None = None) -> None:
    """Refresh the display until cancelled. Log lines written to stderr meanwhile are
    printed above it (``redirect_stderr``) instead of tearing it."""
    console = console or Console(stderr=True)
    view = ProgressView()
    with Live(
        view.render(job.live_stats(), time.monotonic()),
        console=console,
        refresh_per_second=4,
        redirect_stderr=True,
        redirect_stdout=False,
    ) as live:
        try:
            while True:
                await asyncio.sleep(0.25)
                live.update(view.render(job.live_stats(), time.monotonic()))
        except asyncio.CancelledError:
            live.update(view.render(job.live_stats(), time.monotonic()))
            raise


def progress_wanted(log_format: str, stderr: Any) -> bool:
    """Only for a person at a terminal reading console logs."""
    return log_format == "console" and bool(getattr(stderr, "isatty", lambda: False)())
