"""``resume --retry-failed``: take failed records out of the job so they run again, and still
appear exactly once in the result files.

The rows to drop are found by the ledger's (source, key, operation), with their exact place
in each file, so a key held by two sources loses only the failed row. The rewrite is atomic
across a crash at any point:

1. new files are written beside the old ones (``results.jsonl.retry``, ``results.csv.retry``)
   and fsynced; a crash here leaves the old files and ledger untouched (the new files are
   deleted on the next open);
2. one ledger transaction drops the failed records, moves the other rows' offsets, sets the
   new sizes and notes that the renames are pending;
3. the new files are renamed over the old ones and the note is cleared; a crash before that
   finishes is completed by ``recover`` on the next open (the new files are whole by then).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from rekbatch.store.ledger import LedgerDB, _failed_filter

PENDING = "retry_failed_renames"
FILES = ("results.jsonl", "results.csv")
SUFFIX = ".retry"
_CHUNK = 1 << 20
_UPDATE_BATCH = 10_000


def _step(name: str) -> None:
    """Between the steps of a rewrite (tests stop the process here to crash it)."""


def recover(db: LedgerDB, out: Path) -> None:
    """Finish the renames of a rewrite that committed, or drop one that did not."""
    pending = db.get_meta(PENDING)
    for name in FILES:
        new = out / (name + SUFFIX)
        if pending is None:
            new.unlink(missing_ok=True)
        elif new.exists():
            os.replace(new, out / name)
    if pending is not None:
        _sync_dir(out)
        db.delete_meta(PENDING)


def rewrite(db: LedgerDB, out: Path, codes: set[str] | None) -> int:
    """Drop the failed records (with ``codes``, or all) from the files and the ledger;
    returns how many."""
    dropping = db.failed_count(codes)
    if not dropping:
        return 0
    drop = _dropper(codes)
    sizes = db.sink_sizes() or {}
    for name in FILES:
        kind = name.rsplit(".", 1)[1]
        _copy_without(
            out / name, out / (name + SUFFIX), sizes[name], db.rows_in_file_order(kind), drop
        )
    _step("files_written")
    where, args = _failed_filter(codes)
    with db.connection as tx:
        new_sizes = dict(sizes)
        for name in FILES:
            kind = name.rsplit(".", 1)[1]
            new_sizes[name] = _move_offsets(db, kind, drop, sizes[name])
        found = tx.execute(f"SELECT DISTINCT source FROM records WHERE {where}", args)
        sources = [row[0] for row in found]
        tx.execute(f"DELETE FROM records WHERE {where}", args)
        for source in sources:
            tx.execute(
                "UPDATE sources SET watermark = NULL, listing_done = 0, listed = 0 WHERE idx = ?",
                (source,),
            )
            tx.execute("DELETE FROM source_ranges WHERE source = ?", (source,))
        tx.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [("sink_sizes", _json(new_sizes)), (PENDING, "1")],
        )
    _step("committed")
    for name in FILES:
        os.replace(out / (name + SUFFIX), out / name)
        _step(f"renamed:{name}")
    _sync_dir(out)
    db.delete_meta(PENDING)
    return dropping


def _dropper(codes: set[str] | None) -> Callable[[str, str | None], bool]:
    def drop(status: str, error_code: str | None) -> bool:
        return status == "failed" and (not codes or error_code in codes)

    return drop


def _copy_without(
    src: Path,
    dst: Path,
    committed: int,
    rows: Iterator[sqlite3.Row],
    drop: Callable[[str, str | None], bool],
) -> None:
    """Copy ``src`` up to ``committed`` bytes into ``dst`` without the dropped rows."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        position = 0
        for row in rows:
            status, code, offset, length = row[1], row[2], row[3], row[4]
            if offset >= committed or not drop(status, code):
                continue
            _copy_range(fin, fout, position, offset)
            position = offset + length
        _copy_range(fin, fout, position, committed)
        fout.flush()
        os.fsync(fout.fileno())


def _move_offsets(
    db: LedgerDB, kind: str, drop: Callable[[str, str | None], bool], committed: int
) -> int:
    """Shift the kept rows' offsets in ``kind``'s file by the bytes dropped before them;
    returns the file's new committed size."""
    shift = 0
    updates: list[tuple[int, int]] = []
    for row in db.rows_in_file_order(kind):
        rowid, status, code, offset, length = row[0], row[1], row[2], row[3], row[4]
        if offset >= committed:
            continue
        if drop(status, code):
            shift += length
        elif shift:
            updates.append((offset - shift, rowid))
            if len(updates) >= _UPDATE_BATCH:
                db.execute_many(f"UPDATE records SET {kind}_offset = ? WHERE rowid = ?", updates)
                updates = []
    db.execute_many(f"UPDATE records SET {kind}_offset = ? WHERE rowid = ?", updates)
    return committed - shift


def _copy_range(fin: BinaryIO, fout: BinaryIO, start: int, end: int) -> None:
    fin.seek(start)
    left = end - start
    while left > 0:
        data = fin.read(min(_CHUNK, left))
        if not data:
            break
        fout.write(data)
        left -= len(data)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(value: object) -> str:
    import json

    return json.dumps(value)
