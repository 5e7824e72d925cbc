"""Rendering records as JSONL lines and CSV rows. Pure."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from rekbatch.operations.specs import SUMMARY_COLUMNS
from rekbatch.records import Record

BASE_COLUMNS: tuple[str, ...] = (
    "run_id",
    "bucket",
    "key",
    "etag",
    "size",
    "last_modified",
    "operation",
    "status",
    "reason",
    "error_code",
    "error_message",
    "attempts",
    "latency_ms",
    "processed_at",
)
CSV_COLUMNS: tuple[str, ...] = (*BASE_COLUMNS, *SUMMARY_COLUMNS, "result_json")


def jsonl_line(record: Record) -> bytes:
    row = record.to_json_dict()
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(round(value, 6))
    return value


def csv_rows(records: list[Record], summaries: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for record, summary in zip(records, summaries, strict=True):
        row = record.to_json_dict()
        cells = [_cell(row.get(c)) for c in BASE_COLUMNS]
        merged = {**summary, **{k: v for k, v in record.extra.items() if k in SUMMARY_COLUMNS}}
        cells += [_cell(merged.get(c)) for c in SUMMARY_COLUMNS]
        cells.append(
            json.dumps(record.result, ensure_ascii=False, separators=(",", ":"))
            if record.result is not None
            else ""
        )
        writer.writerow(cells)
    return buffer.getvalue().encode("utf-8")


def csv_header() -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(CSV_COLUMNS)
    return buffer.getvalue().encode("utf-8")
