"""``rekbatch merge``: the shards of a job put together as if one process had run it.

Every shard folder (``DIR/shard-KKKK-of-NNNN/``, or the same folders under an S3 prefix the
shards uploaded to) holds its results.jsonl, summary.json and job.json. The merge replays the
shards' JSONL lines, in shard order, into ``DIR/results.jsonl``, renders ``DIR/results.csv``
from them and builds a ledger in ``DIR/.rekbatch/`` (the same code that replays a killed
run's tail), so ``summary.json``, the answers, ``status`` and ``report`` come from the same
SQL as a single run's. Calls, throttles and time are added up from the shards' summaries.

Merging again replaces the merged files: it is safe to run after a shard was rerun.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rekbatch.config import Config
from rekbatch.engine.shards import JOB_FILE, Shard, shard_folders
from rekbatch.errors import SetupError
from rekbatch.operations import build_operations
from rekbatch.operations.summaries import box_text
from rekbatch.records import utc_now
from rekbatch.sinks.files import AppendFile
from rekbatch.sinks.rows import CsvRows, csv_header
from rekbatch.sinks.summary import answer_lines, build_summary, write_summary
from rekbatch.sinks.writer import CSV, JSONL, parse_line, render_rows
from rekbatch.store import jobdir
from rekbatch.store.ledger import LedgerDB
from rekbatch.store.lock import JobLock

BATCH_LINES = 5000
DONE_CODES = frozenset({0, 3})  # a shard that finished: all its records, some maybe failed


@dataclass(frozen=True)
class ShardFiles:
    """One shard's files as the merge reads them (local, or downloaded from S3)."""

    shard: Shard
    folder: Path
    job: dict[str, Any]
    summary: dict[str, Any]

    @property
    def jsonl(self) -> Path:
        return self.folder / JSONL


@dataclass
class MergeOutcome:
    exit_code: int
    summary: dict[str, Any]
    answers: list[str]
    config: Config


def local_shards(directory: Path) -> list[ShardFiles]:
    """The finished shards of the job in ``directory``; a ``SetupError`` naming every shard
    that is missing, running or unfinished."""
    folders = shard_folders(directory)
    if not folders:
        raise SetupError(f"{directory}: no shard folders (shard-KKKK-of-NNNN) here")
    problems: list[str] = []
    for shard, folder in folders.items():
        if JobLock.is_held(jobdir.state_dir(folder) / "lock"):
            problems.append(f"shard {shard} is still running")
            continue
        code = _last_exit_code(folder)
        if code is None or code not in DONE_CODES:
            state = "has not run" if code is None else f"ended with exit code {code}"
            problems.append(f"shard {shard} {state}; run it again with --shard {shard}")
    if problems:
        raise SetupError(f"{directory}: cannot merge yet: " + "; ".join(problems))
    return check_complete(directory, [read_shard(s, f) for s, f in folders.items()])


def _last_exit_code(folder: Path) -> int | None:
    path = jobdir.ledger_path(folder)
    if not path.exists() or not (folder / JOB_FILE).exists():
        return None
    db = LedgerDB(path, readonly=True)
    try:
        runs = db.runs()
    finally:
        db.close()
    if not runs or runs[-1]["exit_code"] is None:
        return None
    return int(runs[-1]["exit_code"])


def read_shard(shard: Shard, folder: Path) -> ShardFiles:
    try:
        job = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SetupError(f"{folder}: cannot read the shard's files: {exc}") from None
    if (job.get("shard"), job.get("shards")) != (shard.index, shard.count):
        raise SetupError(f"{folder}: its {JOB_FILE} is of shard {job.get('shard')}")
    return ShardFiles(shard, folder, job, summary)


def check_complete(where: object, shards: Sequence[ShardFiles]) -> list[ShardFiles]:
    """All N shards of one job, in order; a ``SetupError`` otherwise."""
    counts = sorted({s.shard.count for s in shards})
    if len(counts) != 1:
        raise SetupError(f"{where}: holds shards of different counts ({counts}); merge one set")
    count = counts[0]
    have = {s.shard.index for s in shards}
    missing = [str(k) for k in range(count) if k not in have]
    if missing:
        raise SetupError(
            f"{where}: shard(s) {', '.join(missing)} of {count} missing; run them with "
            f"--shard K/{count}"
        )
    prints = {s.job.get("job_fingerprint") for s in shards}
    if len(prints) != 1:
        raise SetupError(f"{where}: the shards ran different jobs (sources or operations)")
    return sorted(shards, key=lambda s: s.shard.index)


def _refuse_own_job(directory: Path) -> None:
    """A directory that holds a job of its own (not an earlier merge) is not overwritten."""
    path = jobdir.ledger_path(directory)
    if not path.exists():
        return
    db = LedgerDB(path, readonly=True)
    try:
        own = db.get_meta(jobdir.MERGED) is None and db.has_records()
    finally:
        db.close()
    if own:
        raise SetupError(
            f"{directory}: holds a job of its own beside the shards; merge into another "
            "directory (or move the shard folders)"
        )


def _lines(path: Path) -> Iterator[bytes]:
    """The whole lines of a shard's results.jsonl (a finished shard has no torn tail)."""
    if not path.exists():
        return
    with path.open("rb") as handle:
        for line in handle:
            if line.endswith(b"\n"):
                yield line


def merge_shards(directory: Path, shards: Sequence[ShardFiles]) -> MergeOutcome:
    """Write the merged files of ``shards`` into ``directory``."""
    cfg = Config.model_validate(shards[0].job["job_config"])
    directory.mkdir(parents=True, exist_ok=True)
    state = jobdir.state_dir(directory)
    state.mkdir(exist_ok=True)
    lock = JobLock(state / "lock")
    lock.acquire()
    try:
        return _merge_locked(directory, cfg, shards)
    finally:
        lock.release()


def _merge_locked(directory: Path, cfg: Config, shards: Sequence[ShardFiles]) -> MergeOutcome:
    state = jobdir.state_dir(directory)
    _refuse_own_job(directory)
    for child in state.iterdir():
        if child.name != "lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for name in (JSONL, CSV, "summary.json"):
        (directory / name).unlink(missing_ok=True)
    db = LedgerDB(jobdir.ledger_path(directory))
    try:
        db.set_meta(
            {
                "fingerprint": cfg.fingerprint(),
                "config": cfg.model_dump_json(),
                "config_path": "",
                "created_at": utc_now(),
                jobdir.MERGED: str(len(shards)),
            }
        )
        db.register_sources(cfg.source.uris)
        for shard in shards:
            db.add_unrecorded_calls(shard.summary.get("job_calls_outside_records", {}))
        _merge_records(directory, db, cfg.source.uris, shards)
        _merge_person_matches(db, shards)
        summary = _summary(db, cfg, shards)
    finally:
        db.close()
    outputs = [str(directory / JSONL), str(directory / CSV)]
    if cfg.output.parquet_enabled():
        from rekbatch.sinks.parquet import write_parquet

        outputs += [str(p) for p in write_parquet(directory)]
    summary["outputs"] = [*outputs, str(directory / "summary.json")]
    write_summary(directory, summary)
    failed = summary["counts"]["by_status"].get("failed", 0)
    return MergeOutcome(3 if failed else 0, summary, answer_lines(summary), cfg)


def _merge_records(
    directory: Path, db: LedgerDB, sources: Sequence[str], shards: Sequence[ShardFiles]
) -> None:
    jsonl = AppendFile(directory / JSONL)
    csv = AppendFile(directory / CSV, csv_header())
    jsonl.open(None)
    csv.open(None)
    csv_rows = CsvRows()
    listed: dict[int, set[str]] = {}
    try:
        for shard in shards:
            batch: list[bytes] = []
            for line in _lines(shard.jsonl):
                batch.append(line)
                if len(batch) >= BATCH_LINES:
                    _commit(db, jsonl, csv, csv_rows, sources, batch, listed, shard)
                    batch = []
            _commit(db, jsonl, csv, csv_rows, sources, batch, listed, shard)
        jsonl.sync()
        csv.sync()
        counts = {i: len(keys) for i, keys in listed.items()}
        db.commit([], {JSONL: jsonl.size, CSV: csv.size}, {}, counts, range(len(sources)))
    finally:
        jsonl.close()
        csv.close()


def _commit(
    db: LedgerDB,
    jsonl: AppendFile,
    csv: AppendFile,
    csv_rows: CsvRows,
    sources: Sequence[str],
    lines: list[bytes],
    listed: dict[int, set[str]],
    shard: ShardFiles,
) -> None:
    if not lines:
        return
    rows = []
    for line in lines:
        offset = jsonl.append(line)
        row = parse_line(line, offset, sources)
        if row is None:
            raise SetupError(f"{shard.jsonl}: a line at byte {offset} is not a record")
        rows.append(row)
        listed.setdefault(row.record.obj.source_index, set()).add(row.record.obj.key)
    ledger_rows, data = render_rows(rows, sources, csv_rows, csv.size)
    csv.append(data)
    db.commit(ledger_rows, {JSONL: jsonl.size, CSV: csv.size}, {}, {}, [])


def _merge_person_matches(db: LedgerDB, shards: Sequence[ShardFiles]) -> None:
    """search_faces' matches live in each shard's summary (they come from collection
    searches, not from the records)."""
    sources = {
        (row["bucket"], row["key"]): row["source"]
        for row in db.connection.execute(
            "SELECT DISTINCT bucket, key, source FROM records WHERE operation = 'search_faces'"
        )
    }
    rows: list[tuple[str, int, str, str | None, float, str | None]] = []
    for shard in shards:
        search = shard.summary.get("search_faces") or {}
        for person, found in (search.get("people") or {}).items():
            for match in found.get("matches", []):
                source = sources.get((match["bucket"], match["key"]))
                if source is not None:
                    box = box_text(match.get("bounding_box"))
                    rows.append(
                        (person, source, match["key"], match["bucket"], match["similarity"], box)
                    )
    db.save_person_matches(rows)


def _summary(db: LedgerDB, cfg: Config, shards: Sequence[ShardFiles]) -> dict[str, Any]:
    by_api: dict[str, int] = {}
    throttles = retries = 0
    elapsed = 0.0
    cost = 0.0
    per_shard = []
    for shard in shards:
        s = shard.summary
        calls = s.get("calls", {})
        for api, n in calls.get("by_api", {}).items():
            by_api[api] = by_api.get(api, 0) + int(n)
        throttles += int(calls.get("throttles", 0))
        retries += int(calls.get("retries", 0))
        elapsed = max(elapsed, float(s.get("elapsed_seconds", 0.0)))
        cost += float(s.get("estimated_cost_usd", 0.0))
        per_shard.append(
            {
                "shard": shard.shard.index,
                "run_id": s.get("run_id"),
                "calls": calls.get("total", 0),
                "elapsed_seconds": s.get("elapsed_seconds"),
                "calls_per_second": s.get("calls_per_second"),
            }
        )
    total = sum(by_api.values())
    live = {
        "calls": by_api,
        "throttles": {"all": throttles},
        "retries": {"all": retries},
        "elapsed_seconds": elapsed,
        # The shards ran side by side: their rates add up while they all run.
        "calls_per_second": round(total / elapsed, 2) if elapsed > 0 else 0.0,
        "limiters": {},
    }
    operations = build_operations(cfg)
    summary = build_summary(db, cfg, operations, live, {})
    summary["estimated_cost_usd"] = round(cost, 6)
    summary["run_id"] = None
    summary["stopped"] = None
    summary["shards"] = per_shard
    for op in operations:
        merged = summary.get(op.type)
        if not isinstance(merged, dict):
            continue
        # What the operation learnt while preparing (the reference's faces, the
        # collections) is not in the records: take it from the shards.
        for shard in shards:
            section = shard.summary.get(op.type) or {}
            for key in ("faces", "face_used"):
                if key in section and key not in merged:
                    merged[key] = section[key]
            if merged.get("collections") is not None:
                merged["collections"] += section.get("collections") or []
            if section.get("complete") is False:
                merged["complete"] = False
                merged["error"] = section.get("error")
    return summary
