"""The job's durable memory: SQLite in WAL mode inside the output directory.

It holds the state of every (object, operation), the committed size of each result file, and
per source the listing watermark: the last key below which every object is finished. Each
batch of results is committed in one transaction together with the new file sizes and
watermarks, after the files themselves were fsynced.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    idx INTEGER PRIMARY KEY,
    uri TEXT NOT NULL,
    watermark TEXT,
    listed INTEGER NOT NULL DEFAULT 0,
    listing_done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS records (
    source INTEGER NOT NULL,
    key TEXT NOT NULL,
    operation TEXT NOT NULL,
    bucket TEXT,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL,
    billed INTEGER NOT NULL,
    matched INTEGER,
    similarity REAL,
    match_box TEXT,
    detail TEXT,
    dedup_of TEXT,
    processed_at TEXT NOT NULL,
    PRIMARY KEY (source, key, operation)
);
CREATE INDEX IF NOT EXISTS records_status ON records (status, operation);
CREATE INDEX IF NOT EXISTS records_detail ON records (operation, detail);
CREATE TABLE IF NOT EXISTS person_matches (
    person TEXT NOT NULL,
    source INTEGER NOT NULL,
    key TEXT NOT NULL,
    bucket TEXT,
    similarity REAL NOT NULL,
    box TEXT,
    PRIMARY KEY (person, source, key)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    stats TEXT NOT NULL DEFAULT '{}'
);
"""


@dataclass(frozen=True, slots=True)
class LedgerRow:
    source: int
    key: str
    operation: str
    bucket: str | None
    etag: str
    size: int
    status: str
    reason: str | None
    error_code: str | None
    error_message: str | None
    attempts: int
    billed: int
    matched: bool | None
    similarity: float | None
    match_box: str | None
    detail: str | None
    dedup_of: str | None
    processed_at: str


class Ledger:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch survives power loss, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        self._db.row_factory = sqlite3.Row
        self._write_lock = threading.Lock()
        # The producer looks keys up from a worker thread while the writer commits from
        # another: each gets its own connection (WAL lets readers and the writer overlap).
        self._reader = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10
        )

    def close(self) -> None:
        self._reader.close()
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # Writes come from worker threads (the writer's commits, the heartbeat): one at a
        # time, so no statement ever lands inside another's transaction.
        with self._write_lock, self._db:
            yield self._db

    # -- job identity and files -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, values: dict[str, str]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def sink_sizes(self) -> dict[str, int] | None:
        raw = self.get_meta("sink_sizes")
        return None if raw is None else {k: int(v) for k, v in json.loads(raw).items()}

    def register_sources(self, uris: list[str]) -> None:
        with self._tx() as db:
            for idx, uri in enumerate(uris):
                db.execute(
                    "INSERT INTO sources (idx, uri) VALUES (?, ?) ON CONFLICT (idx) DO NOTHING",
                    (idx, uri),
                )

    def sources(self) -> list[sqlite3.Row]:
        return list(self._db.execute("SELECT * FROM sources ORDER BY idx"))

    def watermark(self, source: int) -> str | None:
        row = self._db.execute("SELECT watermark FROM sources WHERE idx = ?", (source,)).fetchone()
        return None if row is None else row[0]

    def lookup(self, source: int, keys: list[str]) -> dict[str, dict[str, str]]:
        """Per key of ``keys`` already recorded, its operations and the ETag they saw."""
        done: dict[str, dict[str, str]] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._reader.execute(
                f"SELECT key, operation, etag FROM records WHERE source = ? AND key IN ({marks})",
                (source, *part),
            )
            for key, op, etag in rows:
                done.setdefault(key, {})[op] = etag
        return done

    def rebase_listed(self, source: int, watermark: str | None) -> None:
        """Before listing after ``watermark``: count as listed only the objects below it, so
        keys listed by an interrupted run and listed again are not counted twice."""
        with self._tx() as db:
            db.execute(
                "UPDATE sources SET listed = (SELECT COUNT(DISTINCT key) FROM records "
                "WHERE source = ? AND key <= ?) WHERE idx = ?",
                (source, watermark or "", source),
            )

    def has_records(self) -> bool:
        return self._db.execute("SELECT 1 FROM records LIMIT 1").fetchone() is not None

    def images_sent(self) -> int:
        """Objects that reached Rekognition (not skipped), for budget caps across runs."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT source, key FROM records "
            "WHERE status != 'skipped')"
        ).fetchone()
        return int(row[0])

    # -- the commit of a batch --------------------------------------------------------------

    def commit(
        self,
        rows: Iterable[LedgerRow],
        sink_sizes: dict[str, int],
        watermarks: dict[int, str],
        listed: dict[int, int],
        listing_done: Iterable[int],
    ) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO records VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.source,
                        r.key,
                        r.operation,
                        r.bucket,
                        r.etag,
                        r.size,
                        r.status,
                        r.reason,
                        r.error_code,
                        r.error_message,
                        r.attempts,
                        r.billed,
                        None if r.matched is None else int(r.matched),
                        r.similarity,
                        r.match_box,
                        r.detail,
                        r.dedup_of,
                        r.processed_at,
                    )
                    for r in rows
                ],
            )
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('sink_sizes', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (json.dumps(sink_sizes),),
            )
            for source, key in watermarks.items():
                db.execute("UPDATE sources SET watermark = ? WHERE idx = ?", (key, source))
            for source, count in listed.items():
                db.execute("UPDATE sources SET listed = listed + ? WHERE idx = ?", (count, source))
            for source in listing_done:
                db.execute("UPDATE sources SET listing_done = 1 WHERE idx = ?", (source,))

    def forget(self, keys: Iterable[tuple[int, str, str]]) -> None:
        """Drop records so that they are processed again (``resume --retry-failed``)."""
        with self._tx() as db:
            db.executemany(
                "DELETE FROM records WHERE source = ? AND key = ? AND operation = ?", list(keys)
            )

    def reset_listing(self, sources: Iterable[int]) -> None:
        with self._tx() as db:
            for source in sources:
                db.execute(
                    "UPDATE sources SET watermark = NULL, listing_done = 0, listed = 0 "
                    "WHERE idx = ?",
                    (source,),
                )

    # -- search_faces answers ---------------------------------------------------------------

    def objects_with_detail(self, operation: str, detail: str) -> list[sqlite3.Row]:
        """The objects whose record of ``operation`` carries ``detail`` (an ExternalImageId:
        the indexed object and its copies recorded with dedup_of)."""
        return list(
            self._db.execute(
                "SELECT source, key, bucket FROM records "
                "WHERE operation = ? AND detail = ? AND status = 'ok'",
                (operation, detail),
            )
        )

    def save_person_matches(
        self, rows: list[tuple[str, int, str, str | None, float, str | None]]
    ) -> None:
        """Upsert (person, source, key, bucket, similarity, box) keeping the best similarity."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO person_matches VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (person, source, key) DO UPDATE SET "
                "similarity = excluded.similarity, box = excluded.box "
                "WHERE excluded.similarity > person_matches.similarity",
                rows,
            )

    def person_matches(self) -> list[sqlite3.Row]:
        return list(self._db.execute("SELECT * FROM person_matches ORDER BY person, source, key"))

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, run_id: str, pid: int) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (run_id, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?)",
                (run_id, pid, now, now),
            )

    def heartbeat(self, run_id: str, stats: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET heartbeat_at = ?, stats = ? WHERE run_id = ?",
                (time.time(), json.dumps(stats), run_id),
            )

    def end_run(self, run_id: str, exit_code: int, stats: dict[str, Any]) -> None:
        with self._tx() as db:
            now = time.time()
            db.execute(
                "UPDATE runs SET heartbeat_at = ?, ended_at = ?, exit_code = ?, stats = ? "
                "WHERE run_id = ?",
                (now, now, exit_code, json.dumps(stats), run_id),
            )

    def runs(self) -> list[sqlite3.Row]:
        return list(self._db.execute("SELECT * FROM runs ORDER BY started_at"))

    # -- reading for status and summary -----------------------------------------------------

    def counts(self) -> list[sqlite3.Row]:
        return list(
            self._db.execute(
                "SELECT operation, status, reason, COUNT(*) AS n, SUM(billed) AS billed "
                "FROM records GROUP BY operation, status, reason"
            )
        )

    def top_errors(self, limit: int = 5) -> list[sqlite3.Row]:
        return list(
            self._db.execute(
                "SELECT operation, error_code, COUNT(*) AS n, MAX(error_message) AS example "
                "FROM records WHERE status = 'failed' GROUP BY operation, error_code "
                "ORDER BY n DESC LIMIT ?",
                (limit,),
            )
        )

    def failed(self, codes: set[str] | None) -> list[tuple[int, str, str]]:
        rows = self._db.execute(
            "SELECT source, key, operation, error_code FROM records WHERE status = 'failed'"
        )
        return [(r[0], r[1], r[2]) for r in rows if not codes or r[3] in codes]

    def operation_rows(self, operation: str, status: str = "ok") -> list[sqlite3.Row]:
        return list(
            self._db.execute(
                "SELECT * FROM records WHERE operation = ? AND status = ? ORDER BY source, key",
                (operation, status),
            )
        )
