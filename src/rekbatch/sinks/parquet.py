"""Parquet exports of ``results.jsonl``, for DuckDB, Athena, Spark or pandas.

``write_parquet`` streams the current rows of ``results.jsonl`` (one per object and operation,
``sinks/current.py``) in batches (memory stays bounded for millions of rows) and writes
three files with fixed schemas, empty but typed when there are no rows:

- ``results.parquet``: one row per (object, operation), the contract's columns plus the
  flattened summary columns of ``results.csv``, typed, and the whole result as ``result_json``.
- ``faces.parquet``: one row per face of ``detect_faces`` and ``compare_faces`` results, and
  of IndexFaces results (``index_faces``, ``search_faces``' collection): indexed faces with
  their ``face_id`` and ``collection_id`` (what ``rekbatch find`` answers with), unindexed
  ones with ``indexed`` false and IndexFaces' reasons.
- ``labels.parquet``: one row per label of ``detect_labels`` results.

pyarrow is an optional extra: ``pip install 'rekbatch[parquet]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rekbatch.errors import EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, SetupError
from rekbatch.operations.summaries import SUMMARY_COLUMNS, summarize
from rekbatch.records import IMAGE_FIELDS
from rekbatch.sinks.rows import BASE_COLUMNS, CSV_COLUMNS

RESULTS_FILE = "results.parquet"
FACES_FILE = "faces.parquet"
LABELS_FILE = "labels.parquet"
PARQUET_FILES: tuple[str, ...] = (RESULTS_FILE, FACES_FILE, LABELS_FILE)

# The README's examples; the tests run these very strings. ``{dir}`` is the output directory.
EXAMPLE_QUERIES: dict[str, str] = {
    "top_labels": (
        "SELECT name, COUNT(DISTINCT coalesce(bucket, '') || '/' || key) AS images\n"
        "FROM read_parquet('{dir}/labels.parquet')\n"
        "GROUP BY name\n"
        "ORDER BY images DESC, name\n"
        "LIMIT 10"
    ),
    "crowded_images": (
        "SELECT bucket, key, COUNT(*) AS faces\n"
        "FROM read_parquet('{dir}/faces.parquet')\n"
        "WHERE operation = 'detect_faces'\n"
        "GROUP BY bucket, key\n"
        "HAVING COUNT(*) > 3\n"
        "ORDER BY faces DESC, key"
    ),
    "reference_matched": (
        "SELECT bucket, key, best_similarity\n"
        "FROM read_parquet('{dir}/results.parquet')\n"
        "WHERE operation = 'compare_faces' AND matched\n"
        "ORDER BY best_similarity DESC, key"
    ),
}

_INT_COLUMNS = frozenset(
    {"size", "attempts", "face_count", "person_count", *IMAGE_FIELDS} - {"converted_from"}
)
_FLOAT_COLUMNS = frozenset({"latency_ms", "best_similarity"})
_BOOL_COLUMNS = frozenset({"matched"})
_TIME_COLUMNS = frozenset({"last_modified", "processed_at"})

FACE_COLUMNS: tuple[str, ...] = (
    "bucket",
    "key",
    "etag",
    "operation",
    "source_operation",
    "face_index",
    "bbox_left",
    "bbox_top",
    "bbox_width",
    "bbox_height",
    "confidence",
    "age_low",
    "age_high",
    "emotion_top",
    "emotion_top_confidence",
    "smile",
    "eyeglasses",
    "gender",
    "similarity",
    "matched",
    "face_id",
    "collection_id",
    "indexed",
    "unindexed_reasons",
)
LABEL_COLUMNS: tuple[str, ...] = (
    "bucket",
    "key",
    "etag",
    "name",
    "confidence",
    "parents",
    "categories",
    "instance_count",
)

DEFAULT_BATCH_ROWS = 1_000  # rows turned from Python objects into Arrow at a time
ROW_GROUP_ROWS = 5_000  # rows of Arrow kept before one row group is written
_BATCH_BYTES = 8 * 1024 * 1024  # convert earlier when the JSON read so far is this large


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SetupError(
            "Parquet output needs pyarrow: pip install 'rekbatch[parquet]' "
            "(or pip install 'pyarrow>=14')"
        ) from None
    return pa, pq


def parquet_schemas() -> dict[str, Any]:
    """The fixed ``pyarrow.Schema`` of each Parquet file, by file name."""
    pa, _ = _pyarrow()
    time = pa.timestamp("ms", tz="UTC")

    def results_type(name: str) -> Any:
        if name in _TIME_COLUMNS:
            return time
        if name in _INT_COLUMNS:
            return pa.int64()
        if name in _FLOAT_COLUMNS:
            return pa.float64()
        if name in _BOOL_COLUMNS:
            return pa.bool_()
        return pa.string()

    faces = {
        "face_index": pa.int32(),
        "bbox_left": pa.float64(),
        "bbox_top": pa.float64(),
        "bbox_width": pa.float64(),
        "bbox_height": pa.float64(),
        "confidence": pa.float64(),
        "age_low": pa.int32(),
        "age_high": pa.int32(),
        "emotion_top_confidence": pa.float64(),
        "smile": pa.bool_(),
        "eyeglasses": pa.bool_(),
        "similarity": pa.float64(),
        "matched": pa.bool_(),
        "indexed": pa.bool_(),
    }
    labels = {
        "confidence": pa.float64(),
        "parents": pa.list_(pa.string()),
        "categories": pa.list_(pa.string()),
        "instance_count": pa.int32(),
    }
    return {
        RESULTS_FILE: pa.schema([(c, results_type(c)) for c in CSV_COLUMNS]),
        FACES_FILE: pa.schema([(c, faces.get(c, pa.string())) for c in FACE_COLUMNS]),
        LABELS_FILE: pa.schema([(c, labels.get(c, pa.string())) for c in LABEL_COLUMNS]),
    }


# -- value coercion ---------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    return None


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return ";".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return str(value)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    parsed = parsed.astimezone(UTC)
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


def _coerce(name: str, value: Any) -> Any:
    if name in _TIME_COLUMNS:
        return _time(value)
    if name in _INT_COLUMNS:
        return _int(value)
    if name in _FLOAT_COLUMNS:
        return _float(value)
    if name in _BOOL_COLUMNS:
        return _bool(value)
    return _str(value)


# -- rows -------------------------------------------------------------------------------------


def results_row(row: dict[str, Any]) -> dict[str, Any]:
    """One results.jsonl row as a results.parquet row (typed, summary recomputed)."""
    result = row.get("result")
    summary: dict[str, Any] = {}
    if row.get("status") == "ok" and isinstance(result, dict):
        summary = dict(summarize(str(row.get("operation")), result))
    # Columns the pipeline wrote itself (search_faces' people, dedup_of) win, as in the CSV.
    summary.update({k: row[k] for k in SUMMARY_COLUMNS if row.get(k) is not None})
    out = {c: _coerce(c, row.get(c)) for c in (*BASE_COLUMNS, *IMAGE_FIELDS)}
    out.update({c: _coerce(c, summary.get(c)) for c in SUMMARY_COLUMNS})
    out["result_json"] = (
        json.dumps(result, ensure_ascii=False, separators=(",", ":"))
        if result is not None
        else None
    )
    return out


def _face(
    ident: dict[str, Any],
    api: str,
    index: int,
    face: dict[str, Any],
    similarity: float | None,
    matched: bool | None,
) -> dict[str, Any]:
    box = face.get("BoundingBox") or {}
    age = face.get("AgeRange") or {}
    emotions = [e for e in face.get("Emotions") or [] if isinstance(e, dict)]
    top = max(emotions, key=lambda e: _float(e.get("Confidence")) or 0.0, default=None)
    return {
        **ident,
        "source_operation": api,
        "face_index": index,
        "bbox_left": _float(box.get("Left")),
        "bbox_top": _float(box.get("Top")),
        "bbox_width": _float(box.get("Width")),
        "bbox_height": _float(box.get("Height")),
        "confidence": _float(face.get("Confidence")),
        "age_low": _int(age.get("Low")),
        "age_high": _int(age.get("High")),
        "emotion_top": _str(top.get("Type")) if top else None,
        "emotion_top_confidence": _float(top.get("Confidence")) if top else None,
        "smile": _bool((face.get("Smile") or {}).get("Value")),
        "eyeglasses": _bool((face.get("Eyeglasses") or {}).get("Value")),
        "gender": _str((face.get("Gender") or {}).get("Value")),
        "similarity": similarity,
        "matched": matched,
        "face_id": None,
        "collection_id": None,
        "indexed": None,
        "unindexed_reasons": None,
    }


def _indexed_rows(ident: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """IndexFaces' FaceRecords (indexed) then UnindexedFaces (with their reasons)."""
    faces: list[dict[str, Any]] = []
    collection = _str(result.get("CollectionId"))
    for record in result.get("FaceRecords") or []:
        face = record.get("Face") or {}
        detail = {**face, **(record.get("FaceDetail") or {})}
        row = _face(ident, "IndexFaces", len(faces), detail, None, None)
        row.update(face_id=_str(face.get("FaceId")), collection_id=collection, indexed=True)
        faces.append(row)
    for unindexed in result.get("UnindexedFaces") or []:
        row = _face(ident, "IndexFaces", len(faces), unindexed.get("FaceDetail") or {}, None, None)
        row.update(
            collection_id=collection,
            indexed=False,
            unindexed_reasons=_str(unindexed.get("Reasons") or []),
        )
        faces.append(row)
    return faces


def face_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The faces of one ok ``detect_faces``, ``compare_faces`` or IndexFaces row.

    ``operation`` is rekbatch's operation type (joins with results.parquet);
    ``source_operation`` is the Rekognition API whose response listed the face. For
    compare_faces, FaceMatches come first (``matched`` true, with ``similarity``), then
    UnmatchedFaces (``matched`` false).
    """
    result = row.get("result")
    if row.get("status") != "ok" or not isinstance(result, dict):
        return []
    ident = {k: _str(row.get(k)) for k in ("bucket", "key", "etag", "operation")}
    operation = row.get("operation")
    if operation == "detect_faces":
        details = [f for f in result.get("FaceDetails") or [] if isinstance(f, dict)]
        return [_face(ident, "DetectFaces", i, f, None, None) for i, f in enumerate(details)]
    if operation == "compare_faces":
        faces: list[dict[str, Any]] = []
        for match in result.get("FaceMatches") or []:
            face = match.get("Face") or {}
            similarity = _float(match.get("Similarity"))
            faces.append(_face(ident, "CompareFaces", len(faces), face, similarity, True))
        for face in result.get("UnmatchedFaces") or []:
            faces.append(_face(ident, "CompareFaces", len(faces), face, None, False))
        return faces
    if operation in ("index_faces", "search_faces") and "FaceRecords" in result:
        return _indexed_rows(ident, result)
    return []


def label_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The labels of one ok ``detect_labels`` row."""
    result = row.get("result")
    if row.get("operation") != "detect_labels" or row.get("status") != "ok":
        return []
    if not isinstance(result, dict):
        return []
    ident = {k: _str(row.get(k)) for k in ("bucket", "key", "etag")}
    labels = []
    for label in result.get("Labels") or []:
        if not isinstance(label, dict):
            continue
        labels.append(
            {
                **ident,
                "name": _str(label.get("Name")),
                "confidence": _float(label.get("Confidence")),
                "parents": [str(p.get("Name")) for p in label.get("Parents") or []],
                "categories": [str(c.get("Name")) for c in label.get("Categories") or []],
                "instance_count": len(label.get("Instances") or []),
            }
        )
    return labels


# -- streaming --------------------------------------------------------------------------------


def iter_jsonl(path: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """(row, line size in bytes) for each current row of ``path`` (a job's results.jsonl:
    see ``sinks/current.py``; every line where the job has no ledger).

    An unterminated last line that does not parse (a write in progress, or a crash before
    the job's next resume cut it back) is left out; a bad line anywhere else is an error.
    """
    from rekbatch.sinks.current import current_lines

    lines = current_lines(path.parent) if path.name == "results.jsonl" else _lines(path)
    with contextlib.closing(lines):
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                if not line.endswith(b"\n"):
                    return
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            yield row, len(line)


def _lines(path: Path) -> Generator[bytes]:
    with path.open("rb") as handle:
        yield from handle


def write_parquet(output_dir: Path, *, batch_rows: int = DEFAULT_BATCH_ROWS) -> list[Path]:
    """Write results/faces/labels.parquet from the current rows of
    ``output_dir/results.jsonl`` (one per object and operation); their paths.

    Each file is written beside its final name and renamed into place once complete, so a
    reader never sees half a file. Raises ``SetupError`` when pyarrow is missing and
    ``FileNotFoundError`` when there is no results.jsonl.
    """
    pa, pq = _pyarrow()
    source = output_dir / "results.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no results to convert")
    schemas = parquet_schemas()
    finals = [output_dir / name for name in PARQUET_FILES]
    temps = [path.with_name(path.name + ".tmp") for path in finals]
    # Rows as Python dicts cost about ten times their Arrow form: they are turned into Arrow
    # every ``batch_rows``, and the Arrow tables written as one row group every
    # ROW_GROUP_ROWS, so memory stays flat and row groups stay large enough for readers.
    buffers: list[list[dict[str, Any]]] = [[], [], []]
    tables: list[list[Any]] = [[], [], []]
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(pq.ParquetWriter(str(temp), schemas[final.name]))
            for temp, final in zip(temps, finals, strict=True)
        ]

        def flush(*, write: bool = False) -> None:
            for index, (writer, final) in enumerate(zip(writers, finals, strict=True)):
                rows, held = buffers[index], tables[index]
                if rows:
                    held.append(pa.Table.from_pylist(rows, schema=schemas[final.name]))
                    rows.clear()
                if held and (write or sum(t.num_rows for t in held) >= ROW_GROUP_ROWS):
                    writer.write_table(pa.concat_tables(held))
                    held.clear()

        try:
            pending_bytes = 0
            for row, size in iter_jsonl(source):
                buffers[0].append(results_row(row))
                buffers[1].extend(face_rows(row))
                buffers[2].extend(label_rows(row))
                pending_bytes += size
                if len(buffers[0]) >= batch_rows or pending_bytes >= _BATCH_BYTES:
                    flush()
                    pending_bytes = 0
            flush(write=True)
        except BaseException:
            stack.close()
            for temp in temps:
                temp.unlink(missing_ok=True)
            raise
    for temp, final in zip(temps, finals, strict=True):
        os.replace(temp, final)
    return finals


# The export as its own process: ``python -m rekbatch.sinks.parquet OUTPUT_DIR``. The run
# starts it once its files are complete, so pyarrow (about 40 MB once imported) and the Arrow
# buffers never sit in the run's process, whose memory stays what the scan itself needs.
EXPORT_TIMEOUT_SECONDS = 24 * 3600.0


async def export_in_child(output_dir: Path) -> list[Path]:
    """Run ``write_parquet(output_dir)`` in a child process; the files it wrote.

    Raises ``SetupError`` with the child's last line when the export fails (pyarrow missing,
    a broken results.jsonl, a full disk): the run's results stay in JSONL and CSV, and
    ``rekbatch merge`` or the next run writes the Parquet files again.
    """
    # -P: ``python -m`` would put the working folder first on sys.path, and a ``pyarrow``
    # (or ``rekbatch``) planted there would run. Not -I, which would also drop PYTHONPATH
    # and the user's site-packages, where rekbatch or pyarrow may be installed.
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "rekbatch.sinks.parquet", str(output_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(child.communicate(), EXPORT_TIMEOUT_SECONDS)
    except BaseException:  # cancelled or timed out: leave no exporter behind
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
        raise
    if child.returncode != EXIT_OK:
        lines = err.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit {child.returncode}"
        raise SetupError(f"Parquet export of {output_dir}: {reason}")
    return [Path(line) for line in out.decode().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rekbatch.sinks.parquet OUTPUT_DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        written = write_parquet(Path(args[0]))
    except (SetupError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNEXPECTED
    for path in written:
        print(path)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
