"""The run: a supervisor over the producer, the workers and the writer (``run``), and the
pieces they share: one object's work (``worker``), listing (``producer``), same-content
deduplication (``dedup``) and budget caps (``budget``)."""

from rekbatch.engine.run import Job, RunOptions, RunOutcome, run_job

__all__ = ["Job", "RunOptions", "RunOutcome", "run_job"]
