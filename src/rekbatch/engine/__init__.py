"""The run: a supervisor over the producer, the workers and the writer (``run``), and the
pieces they share: one object's work (``worker``), listing (``producer``), same-content
deduplication (``dedup``) and budget caps (``budget``).

``run`` (and with it the sources and the AWS clients) is imported when one of its names is
asked for, so that ``rekbatch.engine.shards`` stays cheap for commands that only read a job
(``find``, ``status``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rekbatch.engine.run import Job, RunOptions, RunOutcome, run_job

__all__ = ["Job", "RunOptions", "RunOutcome", "run_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rekbatch.engine import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
