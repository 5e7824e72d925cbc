"""The writer: the only owner of the result files, the listing watermarks and their commits.

A record is durable the moment it arrives: ``accept`` encodes it once and appends its line to
results.jsonl with one ``write()``, before anything else happens to it, so a process that dies
after that loses nothing it paid for. Then, in batches (``BATCH_RECORDS`` records or
``BATCH_SECONDS``), the writer renders the batch's CSV rows, appends them, fsyncs both files
and commits the batch to the ledger with the files' new sizes and the watermarks, all on the
ledger's write thread.

When a job opens, results.csv is cut back to its committed size, and the lines of
results.jsonl past its committed size (written, not yet committed, when the last run died)
are replayed into the CSV and the ledger; a torn last line is cut.

A commit that fails (the CSV append, either fsync, the ledger transaction) leaves the ledger
at the previous commit, and the writer then refuses every later commit: a later batch would
record file sizes past the failed batch's rows, and those rows would never be replayed. The
run ends (exit 1) with the failed batch and everything after it in results.jsonl past the
committed size, which is exactly the tail the next run replays.

Windows: after a process kill nothing already answered is lost; after a machine loss, at most
the rows of the last ``BATCH_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from rekbatch.operations.summaries import summarize
from rekbatch.records import ObjectRef, Record
from rekbatch.sinks.files import AppendFile
from rekbatch.sinks.retired import retired_faces
from rekbatch.sinks.rows import (
    RECORD_FIELDS,
    CsvFormulas,
    CsvRows,
    csv_header,
    encode_result,
    jsonl_line,
)
from rekbatch.store.ledger import Ledger, LedgerDB, LedgerRow
from rekbatch.store.watermark import WatermarkTracker

log = structlog.get_logger("rekbatch")

BATCH_RECORDS = 256
BATCH_SECONDS = 0.25
JSONL = "results.jsonl"
CSV = "results.csv"


@dataclass(slots=True)
class _Commit:
    """A batch on the ledger's write thread, and what it changes once it is committed."""

    future: asyncio.Future[None]
    number: int
    sources_done: list[int]
    lanes_done: list[int]


class CommitRefused(RuntimeError):
    """An earlier commit failed: committing more would skip the rows it held."""


@dataclass(slots=True)
class _Row:
    """An accepted record waiting for its batch."""

    record: Record
    run_id: str
    result_json: str
    offset: int
    length: int


class Writer:
    def __init__(
        self,
        out: Path,
        ledger: Ledger,
        run_id: str,
        sources: Sequence[str],
        *,
        durable: bool = True,
        csv_formulas: CsvFormulas = "neutralise",
    ) -> None:
        self.out = out
        self.ledger = ledger
        self.run_id = run_id
        self.sources = list(sources)
        self.durable = durable
        self.jsonl = AppendFile(out / JSONL)
        self.csv = AppendFile(out / CSV, csv_header())
        # One tracker per lane: a key range of a source, listed by one paginator.
        self.trackers: dict[int, WatermarkTracker] = {}
        self._lanes: list[tuple[int, int]] = []  # lane -> (source, range)
        self._lanes_listed: set[int] = set()
        self._lanes_done: set[int] = set()
        self.listed: Counter[int] = Counter()
        self.listing_finished: set[int] = set()
        self.records: Counter[str] = Counter()
        self.objects_done = 0
        # Commits are numbered: rows accepted before commit N is cut are in the ledger
        # once ``committed`` reaches N.
        self.committed = 0
        self._rows: list[_Row] = []
        self._csv_rows = CsvRows(csv_formulas)
        self._committed_listed: Counter[int] = Counter()
        self._done_sources: set[int] = set()
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._stopping = False
        self._inflight: _Commit | None = None
        # The first commit that failed: no commit after it.
        self.failed: BaseException | None = None

    # -- opening ----------------------------------------------------------------------------

    async def open(self) -> int:
        """Open the files, cut the CSV back, replay the uncommitted tail of results.jsonl;
        returns the number of rows replayed."""
        sizes = await self.ledger.read(LedgerDB.sink_sizes)
        try:
            return await self.ledger.write(self._open, sizes)
        except BaseException:
            # The replay did not commit: what it appended to the CSV is cut at the next open.
            await self.ledger.write(_close_files, self.jsonl, self.csv)
            raise

    def _open(self, db: LedgerDB, sizes: dict[str, int] | None) -> int:
        self.jsonl.open(None if sizes is None else sizes.get(JSONL))
        self.csv.open(None if sizes is None else sizes.get(CSV))
        if sizes is None:
            db.commit([], self._sizes(), {}, {}, [])
            return 0
        self.csv.truncate(sizes[CSV])
        committed = sizes[JSONL]
        tail = self.jsonl.pread(committed, self.jsonl.size - committed)
        rows: list[_Row] = []
        offset = committed
        for line in tail.splitlines(keepends=True):
            row = self._parse(line, offset)
            if row is None:
                break  # a torn line: it and anything after it were never whole
            rows.append(row)
            offset += len(line)
        if offset < self.jsonl.size:
            log.warning("cut_torn_tail", file=JSONL, bytes=self.jsonl.size - offset)
            self.jsonl.truncate(offset)
        ledger_rows, csv_data = self._render(rows)
        self.csv.append(csv_data)
        self.jsonl.sync()
        self.csv.sync()
        retired = retired_faces(db, ledger_rows, self.jsonl.pread)
        db.commit(ledger_rows, self._sizes(), {}, {}, [], retired=retired)
        if rows:
            log.info("replayed", rows=len(rows), hint="results written before the last stop")
        return len(rows)

    def _parse(self, line: bytes, offset: int) -> _Row | None:
        return parse_line(line, offset, self.sources)

    # -- what the producer and workers tell it ----------------------------------------------

    def start_range(self, source: int, range_index: int, watermark: str | None) -> int:
        """A key range of ``source`` about to be listed after ``watermark``: its lane."""
        lane = len(self._lanes)
        self._lanes.append((source, range_index))
        self.trackers[lane] = WatermarkTracker(watermark)
        return lane

    def start_source(self, index: int, watermark: str | None) -> int:
        """A source listed as one range (its range 0)."""
        return self.start_range(index, 0, watermark)

    def push(self, lane: int, key: str) -> int:
        """A listed object, in its range's listing order: its place for the watermark."""
        self.listed[self._lanes[lane][0]] += 1
        return self.trackers[lane].push(key)

    def accept(self, record: Record) -> tuple[int, int]:
        """Write ``record`` down now; returns where its line is (offset, length)."""
        result_json = encode_result(record.result)
        source = self.sources[record.obj.source_index]
        line = jsonl_line(record, self.run_id, source, result_json)
        offset = self.jsonl.append(line)
        self._rows.append(_Row(record, self.run_id, result_json, offset, len(line)))
        self.records[record.status] += 1
        if len(self._rows) >= BATCH_RECORDS:
            self._full.set()
        self._wake.set()
        return offset, len(line)

    def finish(self, lane: int, seq: int) -> None:
        """Every record of the object at ``seq`` is accepted (or none was needed)."""
        self.trackers[lane].complete(seq)
        self.objects_done += 1
        self._wake.set()

    def range_listed(self, lane: int) -> None:
        """The lane's range is listed to its end: done once its objects are finished."""
        self._lanes_listed.add(lane)
        self._wake.set()

    def listing_done(self, index: int) -> None:
        self.listing_finished.add(index)
        self._wake.set()

    def read_line(self, offset: int, length: int) -> dict[str, Any]:
        """A row of results.jsonl, parsed (the result a copy of the same content reuses)."""
        parsed: dict[str, Any] = json.loads(self.jsonl.pread(offset, length))
        return parsed

    @property
    def next_commit(self) -> int:
        """The number of the commit that will hold the rows accepted from now on."""
        return self.committed + (2 if self._inflight is not None else 1)

    @property
    def settled_at(self) -> int:
        """The commit after which every row accepted so far is in the ledger (``committed``
        when nothing is waiting)."""
        if self._rows:
            return self.next_commit
        return self.committed + (1 if self._inflight is not None else 0)

    @property
    def listing_complete(self) -> bool:
        return len(self.listing_finished) == len(self.sources)

    # -- batches ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Commit batches until ``stop``; the last one is committed by ``close``."""
        while not self._stopping:
            await self._wake.wait()
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BATCH_SECONDS):
                    await self._full.wait()
            if not self._stopping:
                await self._flush()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._full.set()

    async def close(self) -> None:
        """Commit what is left, then close the files. Safe to call after a failure; raises
        when a commit failed (its rows and all later ones are left for the next run to
        replay)."""
        self.stop()
        try:
            if self._inflight is not None:
                with contextlib.suppress(Exception):
                    await self._settle()
            if self.failed is None:
                await self._flush()
        finally:
            await self.ledger.write(_close_files, self.jsonl, self.csv)
        if self.failed is not None:
            raise CommitRefused(
                f"a commit failed ({type(self.failed).__name__}: {self.failed}); the rows "
                "written since are replayed when the job resumes"
            ) from self.failed

    async def _flush(self) -> None:
        if self.failed is not None:
            raise CommitRefused("an earlier commit failed") from self.failed
        self._wake.clear()
        self._full.clear()
        rows, self._rows = self._rows, []
        marks: dict[tuple[int, int], str] = {}
        for lane, tracker in self.trackers.items():
            if tracker.moved and tracker.mark is not None:
                marks[self._lanes[lane]] = tracker.mark
                tracker.moved = False
        listed = {i: n - self._committed_listed[i] for i, n in self.listed.items()}
        self._committed_listed = Counter(self.listed)
        lanes_done = [
            lane
            for lane in self._lanes_listed - self._lanes_done
            if not self.trackers[lane].outstanding
        ]
        ranges_done = [self._lanes[lane] for lane in lanes_done]
        busy = {self._lanes[lane][0] for lane, t in self.trackers.items() if t.outstanding}
        done = [i for i in self.listing_finished - self._done_sources if i not in busy]
        if not rows and not marks and not any(listed.values()) and not done and not lanes_done:
            return
        ledger_rows, csv_data = self._render(rows)
        jsonl_end = self.jsonl.size  # the end of the batch's last row: rows are in order

        def commit() -> None:
            self.csv.append(csv_data)
            if self.durable:
                self.jsonl.sync()
                self.csv.sync()
            sizes = {JSONL: jsonl_end, CSV: self.csv.size}
            db = self.ledger.writer_db()
            # The faces of the rows these replace leave the index: noted in the same commit.
            retired = retired_faces(db, ledger_rows, self.jsonl.pread)
            db.commit(ledger_rows, sizes, marks, listed, done, ranges_done, retired)

        future = self.ledger.submit_write(commit)
        self._inflight = _Commit(future, self.committed + 1, done, lanes_done)
        await self._settle()

    async def _settle(self) -> None:
        """Wait for the commit in flight. If this task is cancelled meanwhile, the commit
        goes on and stays in flight for ``close`` to settle."""
        pending = self._inflight
        assert pending is not None
        try:
            await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            if not pending.future.cancelled():
                raise
            self._inflight = None
            self.failed = RuntimeError("the commit was cancelled")
            raise
        except BaseException as exc:
            self._inflight = None
            self.failed = exc
            raise
        self._inflight = None
        self.committed = pending.number
        self._done_sources.update(pending.sources_done)
        self._lanes_done.update(pending.lanes_done)

    def _render(self, rows: list[_Row]) -> tuple[list[LedgerRow], bytes]:
        return render_rows(rows, self.sources, self._csv_rows, self.csv.size)

    def _sizes(self) -> dict[str, int]:
        return {JSONL: self.jsonl.size, CSV: self.csv.size}


def _close_files(_db: LedgerDB, *files: AppendFile) -> None:
    for file in files:
        file.close()


def parse_line(line: bytes, offset: int, sources: Sequence[str]) -> _Row | None:
    """A results.jsonl line at ``offset`` back into its record (None for a torn line)."""
    if not line.endswith(b"\n"):
        return None
    try:
        row: dict[str, Any] = json.loads(line)
        source = list(sources).index(row["source"])
        obj = ObjectRef(
            row["bucket"],
            row["key"],
            int(row["size"]),
            row["etag"],
            row["last_modified"],
            None,
            source,
            sequencer=row.get("sequencer"),
        )
        extra = {k: v for k, v in row.items() if k not in RECORD_FIELDS}
        record = Record(
            obj,
            row["operation"],
            row["status"],
            row["reason"],
            row["error_code"],
            row["error_message"],
            int(row["attempts"]),
            row["latency_ms"],
            row["processed_at"],
            row["result"],
            row.get("dedup_of"),
            extra or None,
        )
    except (ValueError, KeyError, TypeError):
        return None
    return _Row(record, str(row["run_id"]), encode_result(record.result), offset, len(line))


def render_rows(
    rows: Sequence[_Row], sources: Sequence[str], csv_rows: CsvRows, csv_at: int
) -> tuple[list[LedgerRow], bytes]:
    """Each row's CSV line and ledger row; the CSV lines' offsets follow from ``csv_at``."""
    ledger_rows: list[LedgerRow] = []
    parts: list[bytes] = []
    render = csv_rows.row
    for row in rows:
        record = row.record
        obj = record.obj
        summary = summarize(record.operation, record.result) if record.status == "ok" else {}
        source = sources[obj.source_index]
        line = render(record, row.run_id, source, summary, row.result_json)
        parts.append(line)
        billed = 0
        if record.status == "ok" and record.dedup_of is None:
            billed = int(summary.get("billed", 1))
        matched = summary.get("matched")
        ledger_rows.append(
            (
                obj.source_index,
                obj.key,
                record.operation,
                obj.bucket,
                obj.etag,
                obj.size,
                record.status,
                record.reason,
                record.error_code,
                record.error_message,
                record.attempts,
                billed,
                summary.get("face_count"),
                None if matched is None else int(matched),
                summary.get("best_similarity"),
                summary.get("match_box"),
                summary.get("detail"),
                record.dedup_of,
                record.processed_at,
                row.offset,
                row.length,
                csv_at,
                len(line),
                obj.sequencer,
            )
        )
        csv_at += len(line)
    return ledger_rows, b"".join(parts)
