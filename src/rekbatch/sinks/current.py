"""The current row of each (object, operation) of a job, read from results.jsonl.

results.jsonl and results.csv are append-only. When an object changes (a later listing finds
a new ETag, or an S3 event says it was created again or removed), its new rows are appended
and the old ones stay in the files, superseded: in file order, the last row of a (source,
key, operation) is the current one. The ledger holds where each current row is, so readers
that want one row per (object, operation) (Parquet, the report) read just those rows, in
file order, merging the ledger's offsets with the file as both are read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator
from pathlib import Path

from rekbatch.store.ledger import LedgerDB

# Where store/jobdir.py keeps a job's ledger (not imported from there: the Parquet export
# runs in a child process that should start without the config models).
LEDGER = Path(".rekbatch") / "ledger.sqlite"


def current_offsets(output_dir: Path) -> Generator[int] | None:
    """The results.jsonl offsets of the current rows, ascending; None when the directory has
    no ledger or one that does not know every row's place (every line then counts)."""
    path = output_dir / LEDGER
    if not path.is_file():
        return None
    db = LedgerDB(path, readonly=True).connection  # also where the folder is read-only
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(records)")}
        if "jsonl_offset" not in columns:
            db.close()
            return None
        unplaced = db.execute("SELECT 1 FROM records WHERE jsonl_offset IS NULL LIMIT 1")
        if unplaced.fetchone() is not None:
            db.close()
            return None
    except BaseException:
        db.close()
        raise
    return _offsets(db)


def _offsets(db: sqlite3.Connection) -> Generator[int]:
    try:
        # One read transaction: the rows a running job commits meanwhile are not seen, and
        # the lines they point at (appended later) are not read either.
        cursor = db.execute("SELECT jsonl_offset FROM records ORDER BY jsonl_offset")
        for (offset,) in cursor:
            yield int(offset)
    finally:
        db.close()


def current_lines(output_dir: Path) -> Generator[bytes]:
    """The lines of ``output_dir/results.jsonl`` that hold current rows, in file order (all
    of its lines where there is no ledger to say)."""
    offsets = current_offsets(output_dir)
    with (output_dir / "results.jsonl").open("rb") as handle:
        if offsets is None:
            yield from handle
            return
        try:
            wanted = next(offsets, None)
            position = 0
            for line in handle:
                while wanted is not None and wanted < position:
                    wanted = next(offsets, None)  # not a line's start: nothing to read there
                if wanted is None:
                    break
                if wanted == position:
                    yield line
                    wanted = next(offsets, None)
                position += len(line)
        finally:
            offsets.close()
