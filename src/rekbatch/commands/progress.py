"""The live progress display on a terminal: rich, on stderr, above which log lines scroll."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rekbatch.pipeline import Job


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "listing…"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


class ProgressView:
    """What the display shows, computed from the job's live counters (pure, testable)."""

    def __init__(self, window: float = 5.0) -> None:
        self._samples: deque[tuple[float, int, dict[str, int]]] = deque()
        self._window = window

    def render(self, job: Job, now: float) -> Group:
        stats = job.stats
        calls = dict(stats.calls)
        self._samples.append((now, stats.objects_done, calls))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        first_t, first_done, first_calls = self._samples[0]
        span = max(now - first_t, 1e-9)
        objects_rate = (stats.objects_done - first_done) / span
        head = Table.grid(padding=(0, 2))
        head.add_row(
            Text(f"listed {stats.listed}", style="bold"),
            Text(f"done {stats.objects_done}"),
            Text(f"ok {stats.records['ok']}", style="green"),
            Text(f"failed {stats.records['failed']}", style="red"),
            Text(f"skipped {stats.records['skipped']}", style="yellow"),
            Text(f"deduplicated {stats.deduplicated}"),
        )
        ops = Table(box=None, padding=(0, 2), show_edge=False)
        for column in ("operation", "calls/s", "limit/s", "in flight", "throttles", "retries"):
            ops.add_column(column, justify="right" if column != "operation" else "left")
        for api, limiter in job.limiters.items():
            rate = (calls.get(api, 0) - first_calls.get(api, 0)) / span
            ops.add_row(
                api,
                f"{rate:.1f}",
                f"{limiter.rate:.1f}",
                str(limiter.in_flight),
                str(stats.throttles[api]),
                str(stats.retries[api]),
            )
        eta: float | None = None
        if job.listing_complete:
            remaining = max(0, stats.listed - stats.objects_done)
            eta = remaining / objects_rate if objects_rate > 0 else None if remaining else 0.0
        foot = Text(f"{objects_rate:.1f} objects/s · ETA {_eta(eta)}", style="dim")
        return Group(head, ops, foot)


async def show_progress(job: Job, console: Console | None = None) -> None:
    """Refresh the display until cancelled. Log lines written to stderr meanwhile are
    printed above it (``redirect_stderr``) instead of tearing it."""
    console = console or Console(stderr=True)
    view = ProgressView()
    with Live(
        view.render(job, time.monotonic()),
        console=console,
        refresh_per_second=4,
        redirect_stderr=True,
        redirect_stdout=False,
    ) as live:
        try:
            while True:
                await asyncio.sleep(0.25)
                live.update(view.render(job, time.monotonic()))
        except asyncio.CancelledError:
            live.update(view.render(job, time.monotonic()))
            raise


def progress_wanted(log_format: str, stderr: Any) -> bool:
    """Only for a person at a terminal reading console logs."""
    return log_format == "console" and bool(getattr(stderr, "isatty", lambda: False)())
