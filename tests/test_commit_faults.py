"""A batch commit that fails, at each of its steps, once or again and again.

A commit appends the batch's CSV rows, fsyncs results.jsonl and results.csv, then writes the
ledger transaction. Whichever step fails, nothing may later commit over the batch: the run
ends resumable, reopening the job replays exactly the uncommitted tail of results.jsonl, and
after the resumes every (object, operation) is in the ledger, results.jsonl and results.csv
exactly once, paid for once. Faults are injected at the seams (``AppendFile``, ``LedgerDB``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rekbatch.engine import RunOutcome
from rekbatch.sinks.files import AppendFile
from rekbatch.sinks.writer import Writer
from rekbatch.store import jobdir
from rekbatch.store.ledger import Ledger, LedgerDB
from tests.helpers import local_images, read_csv, read_jsonl
from tests.support.fake_backend import FakeBackend
from tests.test_engine import assert_exactly_once, expected_pairs, make_config, run

IMAGES = 60
# Small batches: a run of IMAGES objects makes a dozen commits, so a fault has some behind it
# and some after it.
BATCH = 10
MAX_RUNS = 25


class Fault:
    """Counts the calls of one step of a commit; ``fails(n)`` says which of them raise.

    A failing call first waits (bounded) until results.jsonl has grown while the writer
    runs: a real failing fsync or transaction takes time, and workers go on accepting rows
    meanwhile; those rows must not be committed over the failed batch."""

    def __init__(self, fails: Callable[[int], bool]) -> None:
        self.fails = fails
        self.calls = 0
        self.raised = 0
        self.writer_running = False
        self.jsonl: Path | None = None

    def __call__(self) -> None:
        self.calls += 1
        if not self.fails(self.calls):
            return
        self.raised += 1
        if self.writer_running and self.jsonl is not None:
            size = self.jsonl.stat().st_size
            deadline = time.monotonic() + 2.0
            while self.jsonl.stat().st_size == size and time.monotonic() < deadline:
                time.sleep(0.001)
        raise OSError(28, "No space left on device")


def inject(monkeypatch: pytest.MonkeyPatch, step: str, fault: Fault, out: Path) -> None:
    fault.jsonl = out / "results.jsonl"
    real_run = Writer.run

    async def running(self: Writer) -> None:
        fault.writer_running = True
        try:
            await real_run(self)
        finally:
            fault.writer_running = False

    monkeypatch.setattr(Writer, "run", running)
    if step in ("csv_append", "csv_fsync", "jsonl_fsync"):
        name = "results.jsonl" if step == "jsonl_fsync" else "results.csv"
        method = "append" if step == "csv_append" else "sync"
        real_file = getattr(AppendFile, method)

        def on_file(self: AppendFile, *args: Any) -> Any:
            if self.path.name == name:
                fault()
            return real_file(self, *args)

        monkeypatch.setattr(AppendFile, method, on_file)
    else:
        real_meta = LedgerDB._set_meta

        # Inside the commit's transaction, after its rows were inserted: the rollback is
        # part of what is tested.
        def on_meta(self: LedgerDB, values: dict[str, str]) -> None:
            if "sink_sizes" in values:
                fault()
            real_meta(self, values)

        monkeypatch.setattr(LedgerDB, "_set_meta", on_meta)


async def reopen(out: Path, sources: list[str]) -> int:
    """Open the job's writer as a resume would (the replay) and close it; rows replayed."""
    ledger = Ledger(jobdir.ledger_path(out))
    writer = Writer(out, ledger, "reopen", sources)
    try:
        replayed = await writer.open()
        await writer.close()
    finally:
        await ledger.close()
    return replayed


def ledger_pairs(out: Path) -> Counter[tuple[str, str]]:
    db = LedgerDB(jobdir.ledger_path(out), readonly=True)
    try:
        rows = db.connection.execute("SELECT key, operation FROM records")
        return Counter((row[0], row[1]) for row in rows)
    finally:
        db.close()


def lost_rows(out: Path) -> int:
    """Rows in results.jsonl the ledger does not hold (after a reopen: never to be replayed)."""
    written = Counter((r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))
    return sum((written - ledger_pairs(out)).values())


def assert_files_agree(out: Path) -> None:
    written = Counter((r["key"], r["operation"]) for r in read_jsonl(out / "results.jsonl"))
    csv = Counter((r["key"], r["operation"]) for r in read_csv(out / "results.csv"))
    assert written == csv == ledger_pairs(out)


STEPS = ["csv_append", "jsonl_fsync", "csv_fsync", "ledger"]


@pytest.mark.parametrize("step", STEPS)
async def test_a_commit_failing_once_loses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    monkeypatch.setattr("rekbatch.sinks.writer.BATCH_RECORDS", BATCH)
    photos = tmp_path / "photos"
    keys = local_images(photos, IMAGES)
    cfg = make_config(tmp_path, [str(photos)])
    out = tmp_path / "out"
    # The 4th time the step runs: the job's first open and some batches are behind it.
    fault = Fault(lambda n: n == 4)
    inject(monkeypatch, step, fault, out)
    backend = FakeBackend(latency=0.01)
    outcome = await run(cfg, backend)
    assert fault.raised == 1
    assert outcome.exit_code == 1
    assert outcome.failure is not None and outcome.failure.startswith("writer failed")
    assert "No space left on device" in outcome.failure

    # Reopened, the job holds every row results.jsonl holds, once, in all three places.
    await reopen(out, cfg.source.uris)
    assert lost_rows(out) == 0
    assert_files_agree(out)

    again = FakeBackend()
    assert (await run(cfg, again)).exit_code == 0
    assert_exactly_once(out, expected_pairs(photos, keys))
    paid = backend.billed + again.billed
    assert sum(paid.values()) == 2 * IMAGES and max(paid.values()) == 1


@pytest.mark.parametrize("step", STEPS)
async def test_a_commit_failing_again_and_again_loses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Every third time the step runs it fails, in the run and in every resume, the job's
    opening (its replay) included; resumed until a run completes."""
    monkeypatch.setattr("rekbatch.sinks.writer.BATCH_RECORDS", BATCH)
    photos = tmp_path / "photos"
    keys = local_images(photos, IMAGES)
    cfg = make_config(tmp_path, [str(photos)])
    out = tmp_path / "out"
    fault = Fault(lambda n: n % 3 == 0)
    inject(monkeypatch, step, fault, out)
    paid: Counter[tuple[str, str]] = Counter()
    outcomes: list[int] = []
    for _ in range(MAX_RUNS):
        backend = FakeBackend(latency=0.01)
        try:
            outcome: RunOutcome | None = await run(cfg, backend)
        except OSError as exc:  # the opening's replay failed: nothing ran
            assert "No space left on device" in str(exc)
            outcome = None
        paid += backend.billed
        outcomes.append(-1 if outcome is None else outcome.exit_code)
        if outcome is not None and outcome.exit_code == 0:
            break
        assert outcome is None or outcome.exit_code == 1
        # What the ledger committed is exactly the committed part of results.jsonl; the
        # rest is replayed by the next run.
        assert committed_prefix_rows(out) == ledger_pairs(out)
    assert outcomes[-1] == 0, outcomes
    assert fault.raised >= 2
    assert_exactly_once(out, expected_pairs(photos, keys))
    assert sum(paid.values()) == 2 * IMAGES and max(paid.values()) == 1


def committed_prefix_rows(out: Path) -> Counter[tuple[str, str]]:
    """The rows of results.jsonl up to the size the ledger committed (what a reopening does
    not replay)."""
    db = LedgerDB(jobdir.ledger_path(out), readonly=True)
    try:
        sizes = db.sink_sizes()
    finally:
        db.close()
    assert sizes is not None
    with (out / "results.jsonl").open("rb") as handle:
        head = handle.read(sizes["results.jsonl"])
    return Counter((row["key"], row["operation"]) for row in map(json.loads, head.splitlines()))


async def test_a_results_line_written_halfway_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up in the middle of a results.jsonl line: the half line is cut at
    once, so the rows accepted after it sit where the writer says they do."""
    monkeypatch.setattr("rekbatch.sinks.writer.BATCH_RECORDS", BATCH)
    photos = tmp_path / "photos"
    keys = local_images(photos, IMAGES)
    cfg = make_config(tmp_path, [str(photos)])
    out = tmp_path / "out"
    real_append = AppendFile.append
    real_write = os.write
    appends = 0
    halfway: int | None = None

    def append(self: AppendFile, data: bytes) -> int:
        nonlocal appends, halfway
        if self.path.name == "results.jsonl":
            appends += 1
            if appends == 30:
                halfway = self._fd
                assert halfway is not None
        try:
            return real_append(self, data)
        finally:
            halfway = None

    def write(fd: int, data: Any) -> int:
        """As a filling disk does: a short write, then ENOSPC."""
        nonlocal halfway
        if fd == halfway:
            halfway = -1
            return real_write(fd, bytes(data)[: len(data) // 2])
        if halfway == -1:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(AppendFile, "append", append)
    monkeypatch.setattr(os, "write", write)
    backend = FakeBackend(latency=0.01)
    outcome = await run(cfg, backend)
    assert outcome.exit_code == 1
    assert outcome.failure is not None and "No space left on device" in outcome.failure
    monkeypatch.setattr(os, "write", real_write)
    await reopen(out, cfg.source.uris)
    assert_files_agree(out)

    again = FakeBackend()
    assert (await run(cfg, again)).exit_code == 0
    assert_exactly_once(out, expected_pairs(photos, keys))
    # The row whose line was cut was paid for and is asked again; nothing else is.
    assert sum((backend.billed + again.billed).values()) <= 2 * IMAGES + 1
