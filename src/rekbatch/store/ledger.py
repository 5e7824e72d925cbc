"""The job's durable memory: SQLite in WAL mode inside the output directory.

It holds the state of every (object, operation) with where its row sits in the result files,
the committed size of each result file, per source the listing watermark (the last key below
which every object is finished), and the runs. Each batch of results is committed in one
transaction with the new file sizes and watermarks, after the files were fsynced.

``LedgerDB`` is the SQL, on one connection, synchronous. ``Ledger`` is what a run uses: its
writes (commits, heartbeats) run on one dedicated thread and its reads (lookups while listing)
on another, each with its own connection, so no SQLite call runs on the event loop and a
lookup never waits behind a commit's fsync. ``status``, ``merge`` and the summary read
through a ``LedgerDB`` opened read-only.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    idx INTEGER PRIMARY KEY,
    uri TEXT NOT NULL,
    watermark TEXT,
    listed INTEGER NOT NULL DEFAULT 0,
    listing_done INTEGER NOT NULL DEFAULT 0
);
-- A source is listed as disjoint key ranges (after < key <= upto), each with its own
-- watermark; a range is done once every object in it is finished.
CREATE TABLE IF NOT EXISTS source_ranges (
    source INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    after TEXT,
    upto TEXT,
    part TEXT,
    watermark TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, idx)
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
    face_count INTEGER,
    matched INTEGER,
    similarity REAL,
    match_box TEXT,
    detail TEXT,
    dedup_of TEXT,
    processed_at TEXT NOT NULL,
    jsonl_offset INTEGER,
    jsonl_length INTEGER,
    csv_offset INTEGER,
    csv_length INTEGER,
    sequencer TEXT,
    PRIMARY KEY (source, key, operation)
);
CREATE INDEX IF NOT EXISTS records_status ON records (status, operation);
CREATE INDEX IF NOT EXISTS records_detail ON records (operation, detail);
CREATE INDEX IF NOT EXISTS records_etag ON records (etag);
CREATE TABLE IF NOT EXISTS person_matches (
    person TEXT NOT NULL,
    source INTEGER NOT NULL,
    key TEXT NOT NULL,
    bucket TEXT,
    similarity REAL NOT NULL,
    box TEXT,
    PRIMARY KEY (person, source, key)
);
-- Faces of index_faces rows that were replaced (the object changed or was removed), noted
-- in the commit of the new row; deleted from the index once no current row names them.
CREATE TABLE IF NOT EXISTS retired_faces (
    collection TEXT NOT NULL,
    face_id TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (collection, face_id)
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

RECORD_COLUMNS = (
    "source",
    "key",
    "operation",
    "bucket",
    "etag",
    "size",
    "status",
    "reason",
    "error_code",
    "error_message",
    "attempts",
    "billed",
    "face_count",
    "matched",
    "similarity",
    "match_box",
    "detail",
    "dedup_of",
    "processed_at",
    "jsonl_offset",
    "jsonl_length",
    "csv_offset",
    "csv_length",
    "sequencer",
)
_INSERT = (
    f"INSERT OR REPLACE INTO records ({', '.join(RECORD_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(RECORD_COLUMNS))})"
)
UNRECORDED = "calls_outside_records"  # meta: {api: paid calls} over the job's runs
LOOKUP_CHUNK = 500  # SQLite's default limit on host parameters is far above this

# A ledger row: the values of RECORD_COLUMNS, in order.
LedgerRow = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Location:
    """Where a committed ok record's row sits in results.jsonl (for copies of its content)."""

    operation: str
    offset: int
    length: int


class LedgerDB:
    """The ledger's SQL on one connection. Not thread-safe: one thread uses it."""

    def __init__(self, path: Path, *, readonly: bool = False, durable: bool = True) -> None:
        self.path = path
        if readonly:
            self._db = _open_readonly(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed batch survives power loss, not only a process crash.
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
            self._db.executescript(SCHEMA)
            self._migrate()
        self._db.row_factory = sqlite3.Row

    def _migrate(self) -> None:
        """Columns added since the first release, for jobs it started."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        with self._db:
            for name, kind in (
                ("face_count", "INTEGER"),
                ("jsonl_offset", "INTEGER"),
                ("jsonl_length", "INTEGER"),
                ("csv_offset", "INTEGER"),
                ("csv_length", "INTEGER"),
                ("sequencer", "TEXT"),
            ):
                if name not in have:
                    self._db.execute(f"ALTER TABLE records ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self._db.close()

    # -- job identity and files -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, values: dict[str, str]) -> None:
        with self._db:
            self._set_meta(values)

    def _set_meta(self, values: dict[str, str]) -> None:
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            list(values.items()),
        )

    def delete_meta(self, key: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def sink_sizes(self) -> dict[str, int] | None:
        raw = self.get_meta("sink_sizes")
        return None if raw is None else {k: int(v) for k, v in json.loads(raw).items()}

    def register_sources(self, uris: list[str]) -> None:
        with self._db:
            for idx, uri in enumerate(uris):
                self._db.execute(
                    "INSERT INTO sources (idx, uri) VALUES (?, ?) ON CONFLICT (idx) DO NOTHING",
                    (idx, uri),
                )

    def sources(self) -> list[sqlite3.Row]:
        return list(self._db.execute("SELECT * FROM sources ORDER BY idx"))

    def watermark(self, source: int) -> str | None:
        row = self._db.execute("SELECT watermark FROM sources WHERE idx = ?", (source,)).fetchone()
        return None if row is None else row[0]

    def ranges(self, source: int) -> list[sqlite3.Row]:
        return list(
            self._db.execute("SELECT * FROM source_ranges WHERE source = ? ORDER BY idx", (source,))
        )

    def save_ranges(
        self,
        source: int,
        ranges: list[tuple[str | None, str | None, str | None]],
        watermark: str | None,
    ) -> None:
        """The ranges a source is listed in, fixed for the job until its listing restarts;
        ``watermark``: a job started before ranges existed resumes its one range there."""
        with self._db:
            self._db.execute("DELETE FROM source_ranges WHERE source = ?", (source,))
            self._db.executemany(
                "INSERT INTO source_ranges (source, idx, after, upto, part, watermark) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (source, i, after, upto, part, watermark if len(ranges) == 1 else None)
                    for i, (after, upto, part) in enumerate(ranges)
                ],
            )

    def has_records(self) -> bool:
        return self._db.execute("SELECT 1 FROM records LIMIT 1").fetchone() is not None

    # -- lookups while listing --------------------------------------------------------------

    def lookup(self, source: int, keys: list[str]) -> dict[str, dict[str, str]]:
        """Per key of ``keys`` already recorded, its operations and the ETag they saw."""
        done: dict[str, dict[str, str]] = {}
        for start in range(0, len(keys), LOOKUP_CHUNK):
            part = keys[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT key, operation, etag FROM records WHERE source = ? AND key IN ({marks})",
                (source, *part),
            )
            for key, op, etag in rows:
                done.setdefault(key, {})[op] = etag
        return done

    def lookup_events(
        self, source: int, keys: list[str]
    ) -> dict[str, dict[str, tuple[str, str, str | None]]]:
        """Per key of ``keys`` already recorded, per operation (ETag, status, sequencer of the
        S3 event the row was written for): a queue source compares events with them."""
        found: dict[str, dict[str, tuple[str, str, str | None]]] = {}
        for start in range(0, len(keys), LOOKUP_CHUNK):
            part = keys[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                "SELECT key, operation, etag, status, sequencer FROM records "
                f"WHERE source = ? AND key IN ({marks})",
                (source, *part),
            )
            for key, op, etag, status, sequencer in rows:
                found.setdefault(key, {})[op] = (etag, status, sequencer)
        return found

    def set_sequencers(self, rows: list[tuple[str, int, str, str]]) -> None:
        """(sequencer, source, key, operation): a newer event about the same content; the
        rows stay as they are and remember the event, so an older one arriving later is
        recognised."""
        with self._db:
            self._db.executemany(
                "UPDATE records SET sequencer = ? WHERE source = ? AND key = ? AND operation = ?",
                rows,
            )

    def lookup_contents(
        self, contents: list[tuple[str, int]]
    ) -> dict[tuple[str, int], list[Location]]:
        """Committed ok originals (not copies) with the same content (ETag and size) as
        each of ``contents``: where their rows are, per operation."""
        found: dict[tuple[str, int], list[Location]] = {}
        etags = sorted({etag for etag, _ in contents})
        wanted = set(contents)
        for start in range(0, len(etags), LOOKUP_CHUNK):
            part = etags[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                "SELECT etag, size, operation, jsonl_offset, jsonl_length, source, key "
                f"FROM records WHERE etag IN ({marks}) AND status = 'ok' "
                "AND dedup_of IS NULL AND jsonl_offset IS NOT NULL ORDER BY source, key",
                part,
            )
            first: dict[tuple[str, int], tuple[int, str]] = {}
            for etag, size, op, offset, length, source, key in rows:
                content = (etag, size)
                if content not in wanted:
                    continue
                # One original per content: the first object holding it.
                holder = first.setdefault(content, (source, key))
                if holder == (source, key):
                    found.setdefault(content, []).append(Location(op, offset, length))
        return found

    def rebase_listed(self, source: int) -> None:
        """Before listing the rest of each range: count as listed only the objects below the
        ranges' watermarks (all of a done range), so keys listed by an interrupted run and
        listed again are not counted twice."""
        with self._db:
            self._db.execute(
                "UPDATE sources SET listed = (SELECT COUNT(DISTINCT r.key) FROM records r "
                "JOIN source_ranges g ON g.source = r.source WHERE r.source = ? "
                "AND g.part IS NULL AND (g.after IS NULL OR r.key > g.after) AND CASE WHEN g.done "
                "THEN (g.upto IS NULL OR r.key <= g.upto) "
                "ELSE (g.watermark IS NOT NULL AND r.key <= g.watermark) END) WHERE idx = ?",
                (source, source),
            )

    def reset_listing(self, sources: Iterable[int]) -> None:
        with self._db:
            for source in sources:
                self._db.execute(
                    "UPDATE sources SET watermark = NULL, listing_done = 0, listed = 0 "
                    "WHERE idx = ?",
                    (source,),
                )
                self._db.execute("DELETE FROM source_ranges WHERE source = ?", (source,))

    # -- the commit of a batch --------------------------------------------------------------

    def commit(
        self,
        rows: list[LedgerRow],
        sink_sizes: dict[str, int],
        watermarks: dict[tuple[int, int], str],
        listed: dict[int, int],
        listing_done: Iterable[int],
        ranges_done: Iterable[tuple[int, int]] = (),
        retired: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        """``watermarks`` and ``ranges_done`` are keyed by (source, range); ``retired``:
        (collection, FaceId, detail) of the faces the rows replaced here had indexed."""
        with self._db:
            self._db.executemany(_INSERT, rows)
            self._db.executemany("INSERT OR IGNORE INTO retired_faces VALUES (?, ?, ?)", retired)
            self._set_meta({"sink_sizes": json.dumps(sink_sizes)})
            self._db.executemany(
                "UPDATE source_ranges SET watermark = ? WHERE source = ? AND idx = ?",
                [(key, source, idx) for (source, idx), key in watermarks.items()],
            )
            self._db.executemany(
                "UPDATE source_ranges SET done = 1 WHERE source = ? AND idx = ?",
                list(ranges_done),
            )
            for source, count in listed.items():
                if count:
                    self._db.execute(
                        "UPDATE sources SET listed = listed + ? WHERE idx = ?", (count, source)
                    )
            for source in listing_done:
                self._db.execute("UPDATE sources SET listing_done = 1 WHERE idx = ?", (source,))

    def add_unrecorded_calls(self, calls: dict[str, int]) -> None:
        """Add a run's paid calls that no record holds (by API) to the job's."""
        if not any(calls.values()):
            return
        with self._db:
            total = self.unrecorded_calls()
            for api, n in calls.items():
                total[api] = total.get(api, 0) + n
            self._set_meta({UNRECORDED: json.dumps(total, sort_keys=True)})

    def unrecorded_calls(self) -> dict[str, int]:
        """The job's paid calls outside its records: reference checks, collection searches."""
        raw = self.get_meta(UNRECORDED)
        return {} if raw is None else {k: int(v) for k, v in json.loads(raw).items()}

    # -- budgets ----------------------------------------------------------------------------

    def images_sent(self) -> int:
        """Objects that reached the service (not skipped), for budget caps across runs."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM (SELECT DISTINCT source, key FROM records "
            "WHERE status NOT IN ('skipped', 'removed') AND dedup_of IS NULL)"
        ).fetchone()
        return int(row[0])

    def billed_by_operation(self) -> dict[str, int]:
        return {
            row[0]: int(row[1])
            for row in self._db.execute(
                "SELECT operation, SUM(billed) FROM records GROUP BY operation"
            )
        }

    # -- search_faces -----------------------------------------------------------------------

    def objects_with_detail(self, operation: str, detail: str) -> list[sqlite3.Row]:
        """The objects whose ok record of ``operation`` carries ``detail``, with where the
        record's row is in results.jsonl."""
        return list(
            self._db.execute(
                "SELECT source, key, bucket, jsonl_offset, jsonl_length FROM records "
                "WHERE operation = ? AND detail = ? AND status = 'ok'",
                (operation, detail),
            )
        )

    def ok_place(
        self, operation: str, source: int, key: str
    ) -> tuple[int | None, int | None] | None:
        """Where the object's ok record of ``operation`` is in results.jsonl (offset,
        length; None each when not known); None when its current record is not ok."""
        row = self._db.execute(
            "SELECT jsonl_offset, jsonl_length FROM records WHERE source = ? AND key = ? "
            "AND operation = ? AND status = 'ok'",
            (source, key, operation),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    # -- the face index's upkeep ------------------------------------------------------------

    def indexed_rows(
        self, operation: str, objects: list[tuple[int, str]]
    ) -> list[tuple[int, int, str]]:
        """Of ``objects`` (source, key), the ok records of ``operation`` that indexed faces:
        (offset, length, detail) of their rows in results.jsonl."""
        found: list[tuple[int, int, str]] = []
        for source, key in objects:
            row = self._db.execute(
                "SELECT jsonl_offset, jsonl_length, detail FROM records WHERE source = ? "
                "AND key = ? AND operation = ? AND status = 'ok' AND detail LIKE '%/%' "
                "AND jsonl_offset IS NOT NULL",
                (source, key, operation),
            ).fetchone()
            if row is not None:
                found.append((int(row[0]), int(row[1]), str(row[2])))
        return found

    def rows_with_details(
        self, operation: str, details: list[str]
    ) -> list[tuple[str, int | None, int | None]]:
        """The ok records of ``operation`` carrying one of ``details``: (detail, offset,
        length) of their rows (None where the ledger does not know the place)."""
        found: list[tuple[str, int | None, int | None]] = []
        for start in range(0, len(details), LOOKUP_CHUNK):
            part = details[start : start + LOOKUP_CHUNK]
            found += [
                (str(r[0]), r[1], r[2])
                for r in self._db.execute(
                    "SELECT detail, jsonl_offset, jsonl_length FROM records WHERE operation = ? "
                    f"AND status = 'ok' AND detail IN ({','.join('?' * len(part))})",
                    (operation, *part),
                )
            ]
        return found

    def retired_faces(self, limit: int) -> list[tuple[str, str, str]]:
        """Up to ``limit`` retired faces: (collection, FaceId, detail)."""
        return [
            (str(r[0]), str(r[1]), str(r[2]))
            for r in self._db.execute(
                "SELECT collection, face_id, detail FROM retired_faces "
                "ORDER BY collection, face_id LIMIT ?",
                (limit,),
            )
        ]

    def forget_retired(self, faces: list[tuple[str, str]]) -> None:
        """(collection, FaceId): faces deleted from the index, or still named by a row."""
        with self._db:
            self._db.executemany(
                "DELETE FROM retired_faces WHERE collection = ? AND face_id = ?", faces
            )

    def faces_by_detail_prefix(self, operation: str) -> dict[str, int]:
        """Faces indexed per collection (``detail`` is ``collection/external id``); a copy,
        recorded from its original's result, indexed nothing itself."""
        rows = self._db.execute(
            "SELECT substr(detail, 1, instr(detail, '/') - 1) AS collection, "
            "SUM(coalesce(face_count, 0)) FROM records "
            "WHERE operation = ? AND status = 'ok' AND detail LIKE '%/%' AND dedup_of IS NULL "
            "GROUP BY collection",
            (operation,),
        )
        return {row[0]: int(row[1]) for row in rows}

    def collections_of(self, operation: str) -> list[str]:
        """The collections named by ``operation``'s records (``detail`` is ``collection/
        external id``), by seeking the (operation, detail) index from one collection to the
        next instead of reading every record. Collection ids hold no '/' and the character
        after '/' is '0', so every detail of collection C sorts below C + '0'."""
        found: list[str] = []
        at = ""
        while True:
            row = self._db.execute(
                "SELECT detail FROM records WHERE operation = ? AND detail >= ? "
                "ORDER BY detail LIMIT 1",
                (operation, at),
            ).fetchone()
            if row is None:
                return found
            collection, slash, _ = str(row[0]).partition("/")
            if slash:
                found.append(collection)
                at = collection + "0"
            else:
                at = str(row[0]) + "\x00"

    def compare_rows(self, operation: str) -> Iterator[sqlite3.Row]:
        """The ok records of a search_faces compare strategy with a match, streamed."""
        yield from self._db.execute(
            "SELECT source, key, bucket, detail FROM records "
            "WHERE operation = ? AND status = 'ok' AND matched = 1 ORDER BY source, key",
            (operation,),
        )

    def save_person_matches(
        self, rows: list[tuple[str, int, str, str | None, float, str | None]]
    ) -> None:
        """Upsert (person, source, key, bucket, similarity, box) keeping the best similarity."""
        with self._db:
            self._db.executemany(
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
        with self._db:
            self._db.execute(
                "INSERT INTO runs (run_id, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?)",
                (run_id, pid, now, now),
            )

    def heartbeat(self, run_id: str, stats: dict[str, Any]) -> None:
        with self._db:
            self._db.execute(
                "UPDATE runs SET heartbeat_at = ?, stats = ? WHERE run_id = ?",
                (time.time(), json.dumps(stats), run_id),
            )

    def end_run(self, run_id: str, exit_code: int, stats: dict[str, Any]) -> None:
        now = time.time()
        with self._db:
            self._db.execute(
                "UPDATE runs SET heartbeat_at = ?, ended_at = ?, exit_code = ?, stats = ? "
                "WHERE run_id = ?",
                (now, now, exit_code, json.dumps(stats), run_id),
            )

    def runs(self) -> list[sqlite3.Row]:
        return list(self._db.execute("SELECT * FROM runs ORDER BY started_at"))

    # -- aggregates for status and summary --------------------------------------------------

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

    def operation_totals(self, operation: str) -> tuple[int, int]:
        """(ok records, matched records) of ``operation``."""
        row = self._db.execute(
            "SELECT COUNT(*), coalesce(SUM(matched = 1), 0) FROM records "
            "WHERE operation = ? AND status = 'ok'",
            (operation,),
        ).fetchone()
        return int(row[0]), int(row[1])

    def ok_count(self, operation: str) -> int:
        """Ok records of ``operation`` (from the status index alone)."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM records WHERE status = 'ok' AND operation = ?", (operation,)
        ).fetchone()
        return int(row[0])

    def skipped_count(self, operation: str, reason: str) -> int:
        """Records of ``operation`` skipped for ``reason``."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM records WHERE operation = ? AND status = 'skipped' "
            "AND reason = ?",
            (operation, reason),
        ).fetchone()
        return int(row[0])

    def matched_rows(self, operation: str) -> Iterator[sqlite3.Row]:
        yield from self._db.execute(
            "SELECT bucket, key, similarity, match_box FROM records "
            "WHERE operation = ? AND status = 'ok' AND matched = 1 ORDER BY source, key",
            (operation,),
        )

    # -- rewriting (resume --retry-failed) --------------------------------------------------

    def failed_count(self, codes: set[str] | None) -> int:
        query, args = _failed_filter(codes)
        row = self._db.execute(f"SELECT COUNT(*) FROM records WHERE {query}", args).fetchone()
        return int(row[0])

    def rows_in_file_order(self, file: str) -> Iterator[sqlite3.Row]:
        """Every record with its row's place in ``file`` (``jsonl`` or ``csv``), in file
        order, streamed."""
        yield from self._db.execute(
            f"SELECT rowid, status, error_code, {file}_offset AS offset, {file}_length AS length "
            f"FROM records WHERE {file}_offset IS NOT NULL ORDER BY {file}_offset"
        )

    def execute_many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        self._db.executemany(sql, rows)

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that never writes beside the ledger either.

    A WAL database read through ``mode=ro`` still needs its ``-wal`` and ``-shm`` files, and
    creates them when its last writer removed them on closing. In a folder that cannot be
    written (a read-only mount, another user's job) that fails; then, with no ``-wal`` file,
    every commit is in the main file and no run can be writing (a run would need that log),
    so the file is read as immutable."""
    uri = path.absolute().as_uri()
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=10)
    try:
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError:
        db.close()
        wal = path.with_name(path.name + "-wal")
        if not path.exists() or (wal.exists() and wal.stat().st_size > 0):
            raise
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=10)


def _failed_filter(codes: set[str] | None) -> tuple[str, tuple[Any, ...]]:
    if not codes:
        return "status = 'failed'", ()
    marks = ",".join("?" * len(codes))
    return f"status = 'failed' AND error_code IN ({marks})", tuple(sorted(codes))


class Ledger:
    """A run's ledger: writes on one thread, reads on another, never on the event loop."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self._durable = durable
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="ledger-write")
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="ledger-read")
        self._writer: LedgerDB | None = None
        self._reader: LedgerDB | None = None

    def _on_writer(self, fn: Callable[..., T], *a: Any) -> T:
        if self._writer is None:
            self._writer = LedgerDB(self.path, durable=self._durable)
        return fn(self._writer, *a)

    def _on_reader(self, fn: Callable[..., T], *a: Any) -> T:
        if self._reader is None:
            self._reader = LedgerDB(self.path, readonly=True)
        return fn(self._reader, *a)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` on the write thread (commits, meta, runs); ``fn`` is
        typically an unbound ``LedgerDB`` method."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writes, self._on_writer, fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, *args)`` on the read thread (lookups, aggregates)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reads, self._on_reader, fn, *args)

    def submit_write(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the write thread, as a future (the writer's batch: file syncs and
        the commit, in order with every other write)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._writes, fn, *args)

    def writer_db(self) -> LedgerDB:
        """The write connection, for functions already running on the write thread."""
        if self._writer is None:
            self._writer = LedgerDB(self.path, durable=self._durable)
        return self._writer

    async def close(self) -> None:
        loop = asyncio.get_running_loop()

        def close_writer() -> None:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

        def close_reader() -> None:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

        await asyncio.gather(
            loop.run_in_executor(self._writes, close_writer),
            loop.run_in_executor(self._reads, close_reader),
            return_exceptions=True,
        )
        self._writes.shutdown(wait=False)
        self._reads.shutdown(wait=False)
