"""``rekbatch merge``: the shards of a job put together as if one process had run it.

Every shard folder (``DIR/shard-KKKK-of-NNNN/``, or the same folders under an S3 prefix the
shards uploaded to) holds its results.jsonl, summary.json and job.json. The merge replays the
shards' JSONL lines, in shard order, into ``DIR/results.jsonl``, renders ``DIR/results.csv``
from them and builds a ledger in ``DIR/.rekbatch/`` (the same code that replays a killed
run's tail), so ``summary.json``, the answers, ``status`` and ``report`` come from the same
SQL as a single run's. Calls, throttles and time are added up from the shards' summaries.

Merging again replaces the merged files: it is safe to run after a shard was rerun.

Nothing a shard folder says about itself is taken on trust: folder names are ASCII and whole,
every record must belong to its shard by the same hash that split the job (``Shard.owns``),
a record may appear only once, the job's fingerprint is computed again from each shard's
config and must agree, and a local merge uploads only where every shard says it should. A
refused merge says why in one line and leaves no merged files behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from rekbatch.config import Config
from rekbatch.engine.shards import JOB_FILE, JobSplit, Shard, job_file_owns, shard_folders
from rekbatch.errors import EXIT_DONE, EXIT_FAILED_RECORDS, EXIT_OK, SetupError
from rekbatch.operations import build_operations
from rekbatch.operations.summaries import box_text
from rekbatch.records import utc_now
from rekbatch.sinks.files import AppendFile
from rekbatch.sinks.rows import CsvRows, csv_header
from rekbatch.sinks.summary import answer_lines, build_summary, write_summary
from rekbatch.sinks.writer import CSV, JSONL, parse_line, render_rows
from rekbatch.sources.ranges import KeyRange
from rekbatch.store import jobdir
from rekbatch.store.ledger import LedgerDB
from rekbatch.store.lock import JobLock

BATCH_LINES = 5000


@dataclass(frozen=True)
class ShardFiles:
    """One shard's files as the merge reads them (local, or downloaded from S3)."""

    shard: Shard
    folder: Path
    job: dict[str, Any]
    summary: dict[str, Any]
    config: Config  # the whole job's, as this shard's job.json holds it

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
        if code is None or code not in EXIT_DONE:
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
    try:
        config = Config.model_validate(job.get("job_config"))
    except ValidationError:
        raise SetupError(f"{folder}: its {JOB_FILE} holds no valid job config") from None
    return ShardFiles(shard, folder, job, summary, config)


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
    ordered = sorted(shards, key=lambda s: s.shard.index)
    # Computed again, not read: job.json may have been edited, its fingerprint left as it was.
    first = ordered[0].config.fingerprint()
    other = [s.shard.folder for s in ordered if s.config.fingerprint() != first]
    if other:
        raise SetupError(
            f"{where}: the shards ran different jobs (sources or operations): "
            f"{ordered[0].shard.folder} and {', '.join(other)}"
        )
    check_split(where, ordered, first)
    return ordered


def check_split(where: object, ordered: Sequence[ShardFiles], fingerprint: str) -> None:
    """Each shard's job.json says which split of the listing it ran by (``split``, a
    digest) and its own part of it (``parts``), and ``merge`` judges which records a shard
    may hold by that part. So the parts of all shards together must be the split they all
    name: a part widened in one job.json changes the digest. Jobs sharded before splits
    have neither field (their shards own objects by hash)."""
    named = [s.job.get("split") for s in ordered]
    if all(n is None and s.job.get("parts") is None for n, s in zip(named, ordered, strict=True)):
        return
    for name, shard in zip(named, ordered, strict=True):
        if name != named[0] or name is None or shard.job.get("parts") is None:
            raise SetupError(
                f"{where}: {shard.shard.folder} ran by another split of the listing "
                f"({name!r}) than {ordered[0].shard.folder} ({named[0]!r}); merge refused"
            )
    try:
        count = len(ordered[0].job["parts"])
        parts = [[[KeyRange(*b) for b in s.job["parts"][i]] for s in ordered] for i in range(count)]
        made_up = JobSplit(len(ordered), fingerprint, parts).id
    except (TypeError, IndexError, KeyError, ValueError):
        made_up = None
    if made_up != named[0]:
        folders = ", ".join(s.shard.folder for s in ordered)
        raise SetupError(
            f"{where}: the parts in the job.json of {folders} do not make up the split they "
            f"name ({named[0]}): one was edited; merge refused"
        )


def check_upload_target(where: object, shards: Sequence[ShardFiles]) -> None:
    """A local merge uploads where the shards' job.json files say: all of them alike, or
    nowhere (one edited file must not send the whole job's results to another bucket)."""

    def target(s: ShardFiles) -> tuple[str | None, str | None]:
        return s.config.output.upload_uri, s.config.aws.s3_endpoint_url

    def said(s: ShardFiles) -> str:
        uri, endpoint = target(s)
        where = urlsplit(endpoint).netloc.rpartition("@")[2] if endpoint else None
        return f"{s.shard.folder} says {uri or 'no upload'}" + (f" at {where}" if where else "")

    first = shards[0]
    other = next((s for s in shards if target(s) != target(first)), None)
    if other is not None:
        raise SetupError(
            f"{where}: the shards name different upload targets ({said(first)}, "
            f"{said(other)}); output.upload_uri and aws.s3_endpoint_url must agree in every "
            "shard's job.json, merge refused"
        )


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
    cfg = shards[0].config
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
    _refuse_own_job(directory)
    _clear(directory)
    db = LedgerDB(jobdir.ledger_path(directory))
    try:
        _merge_into(directory, db, cfg, shards)
        summary = _summary(db, cfg, shards)
    except SetupError:
        db.close()
        _clear(directory)
        raise
    finally:
        db.close()
    outputs = [str(directory / JSONL), str(directory / CSV)]
    if cfg.output.parquet_enabled():
        from rekbatch.sinks.parquet import write_parquet

        outputs += [str(p) for p in write_parquet(directory)]
    summary["outputs"] = [*outputs, str(directory / "summary.json")]
    write_summary(directory, summary)
    failed = summary["counts"]["by_status"].get("failed", 0)
    code = EXIT_FAILED_RECORDS if failed else EXIT_OK
    return MergeOutcome(code, summary, answer_lines(summary), cfg)


def _merge_into(directory: Path, db: LedgerDB, cfg: Config, shards: Sequence[ShardFiles]) -> None:
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
    _merge_records(directory, db, cfg, shards)
    _merge_person_matches(db, shards)


def _clear(directory: Path) -> None:
    """What a refused merge had written: nothing half-merged stays for status, report or
    an upload to read."""
    for child in jobdir.state_dir(directory).iterdir():
        if child.name != "lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for name in (JSONL, CSV, "summary.json"):
        (directory / name).unlink(missing_ok=True)


def _merge_records(
    directory: Path, db: LedgerDB, cfg: Config, shards: Sequence[ShardFiles]
) -> None:
    sources = cfg.source.uris
    jsonl = AppendFile(directory / JSONL)
    csv = AppendFile(directory / CSV, csv_header())
    jsonl.open(None)
    csv.open(None)
    csv_rows = CsvRows(cfg.output.csv_formulas)
    listed: dict[int, set[str]] = {}
    try:
        for shard in shards:
            batch: list[bytes] = []
            for line in _lines(shard.jsonl):
                batch.append(line)
                if len(batch) >= BATCH_LINES:
                    _commit(db, jsonl, csv, csv_rows, sources, batch, listed, shard, shards)
                    batch = []
            _commit(db, jsonl, csv, csv_rows, sources, batch, listed, shard, shards)
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
    shards: Sequence[ShardFiles],
) -> None:
    if not lines:
        return
    rows = []
    batch: dict[int, set[tuple[str, str]]] = {}
    for line in lines:
        offset = jsonl.append(line)
        row = parse_line(line, offset, sources)
        if row is None:
            raise SetupError(f"{shard.jsonl}: a line at byte {offset} is not a record")
        obj = row.record.obj
        what = f"{json.dumps(obj.key, ensure_ascii=False)} ({row.record.operation})"
        owner = _owner(shards, shard, obj.source_index, obj.bucket, obj.key)
        if owner is not None:
            raise SetupError(
                f"{shard.folder}: holds {what}, a record of {owner}; its files were "
                "changed or copied from another shard, merge refused"
            )
        seen = batch.setdefault(obj.source_index, set())
        if (obj.key, row.record.operation) in seen:
            raise SetupError(f"{shard.folder}: holds {what} twice; merge refused")
        seen.add((obj.key, row.record.operation))
        rows.append(row)
        listed.setdefault(obj.source_index, set()).add(obj.key)
    for source, pairs in batch.items():
        done = db.lookup(source, sorted({key for key, _ in pairs}))
        for key, operation in sorted(pairs):
            if operation in done.get(key, {}):
                what = f"{json.dumps(key, ensure_ascii=False)} ({operation})"
                raise SetupError(f"{shard.folder}: holds {what} twice; merge refused")
    ledger_rows, data = render_rows(rows, sources, csv_rows, csv.size)
    csv.append(data)
    db.commit(ledger_rows, {JSONL: jsonl.size, CSV: csv.size}, {}, {}, [])


def _owner(
    shards: Sequence[ShardFiles], shard: ShardFiles, source: int, bucket: str | None, key: str
) -> str | None:
    """None where ``shard`` owns the object (by the job's split as the shards' job.json
    files hold it, or the hash for jobs sharded before splits) or only its listing knows
    (an inventory, a key list); else which shard does."""
    if job_file_owns(shard.job, source, bucket, key) is not False:
        return None
    for other in shards:
        if other is not shard and job_file_owns(other.job, source, bucket, key):
            return f"shard {other.shard.index}"
    return "no shard"


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
                owner = None
                if source is not None:
                    owner = _owner(shards, shard, source, match["bucket"], match["key"])
                if owner is not None:
                    raise SetupError(
                        f"{shard.folder}: its summary.json finds "
                        f"{json.dumps(person, ensure_ascii=False)} in "
                        f"{json.dumps(match['key'], ensure_ascii=False)}, an object of "
                        f"{owner}; merge refused"
                    )
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
