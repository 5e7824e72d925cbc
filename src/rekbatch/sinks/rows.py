"""Rendering records as results.jsonl lines and results.csv rows. Pure.

A record's result is JSON-encoded once: the JSONL line is built around that text, and the
CSV's ``result_json`` column reuses it.

Keys and detected text are whatever someone put in a name or on a sign, so the CSV is made
safe to open: every field holding a comma, quote, newline or carriage return is quoted, and
(unless ``output.csv_formulas = "raw"``) a text cell a spreadsheet would run as a formula
gets a leading ``'``. results.jsonl (and the Parquet files made from it) keep exact values.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any, Literal

from rekbatch.operations.summaries import SUMMARY_COLUMNS, Summary
from rekbatch.records import IMAGE_FIELDS, Record

BASE_COLUMNS: tuple[str, ...] = (
    "run_id",
    "source",
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
CSV_COLUMNS: tuple[str, ...] = (*BASE_COLUMNS, *IMAGE_FIELDS, *SUMMARY_COLUMNS, "result_json")
# What a results.jsonl line holds of the record itself; its other members are the
# record's ``extra`` (the image's fields, an operation's own).
RECORD_FIELDS = frozenset({*BASE_COLUMNS, "dedup_of", "sequencer", "result"})

CsvFormulas = Literal["neutralise", "raw"]
# What spreadsheets (Excel, LibreOffice, Google Sheets) take as the start of a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

# Where a cell may start with one of them in a rendered row (quoted or not): a superset, as
# the same text may also stand inside a quoted cell. Two patterns: one with "^|" is 5x slower.
_FIRST_FORMULA = re.compile(r'"?[=+\-@\t\r]')
_NEXT_FORMULA = re.compile(r',"?[=+\-@\t\r]')

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_result(result: dict[str, Any] | None) -> str:
    return "null" if result is None else _dumps(result)


def jsonl_line(record: Record, run_id: str, source: str, result_json: str) -> bytes:
    """The record's results.jsonl line; ``result_json`` is ``encode_result(record.result)``."""
    obj = record.obj
    row: dict[str, Any] = {
        "run_id": run_id,
        "source": source,
        "bucket": obj.bucket,
        "key": obj.key,
        "etag": obj.etag,
        "size": obj.size,
        "last_modified": obj.last_modified,
        "operation": record.operation,
        "status": record.status,
        "reason": record.reason,
        "error_code": record.error_code,
        "error_message": record.error_message,
        "attempts": record.attempts,
        "latency_ms": record.latency_ms,
        "processed_at": record.processed_at,
    }
    if record.dedup_of is not None:
        row["dedup_of"] = record.dedup_of
    if obj.sequencer is not None:
        row["sequencer"] = obj.sequencer
    image = record.extra or {}
    for column in IMAGE_FIELDS:  # in every line, null when the object was not sniffed
        row[column] = image.get(column)
    if record.extra:
        row.update(record.extra)
    head = _dumps(row)
    return f'{head[:-1]},"result":{result_json}}}\n'.encode()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return round(value, 6)  # a number: the csv module writes its repr, never neutralised
    return value


def _quote(cell: Any) -> str:
    text = "" if cell is None else str(cell)
    if '"' in text or "," in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


class CsvRows:
    """Renders results.csv rows, one at a time (each row's size is its place in the file)."""

    def __init__(self, formulas: CsvFormulas = "neutralise") -> None:
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\n")
        self._neutralise = formulas == "neutralise"

    def _render(self, cells: list[Any]) -> str:
        buffer = self._buffer
        buffer.seek(0)
        buffer.truncate()
        self._writer.writerow(cells)
        return buffer.getvalue()

    def row(
        self, record: Record, run_id: str, source: str, summary: Summary, result_json: str
    ) -> bytes:
        obj = record.obj
        cells = [
            run_id,
            source,
            _cell(obj.bucket),
            obj.key,
            obj.etag,
            obj.size,
            obj.last_modified,
            record.operation,
            record.status,
            _cell(record.reason),
            _cell(record.error_code),
            _cell(record.error_message),
            record.attempts,
            _cell(record.latency_ms),
            record.processed_at,
        ]
        image = record.extra or {}
        cells.extend(_cell(image.get(column)) for column in IMAGE_FIELDS)
        for column in SUMMARY_COLUMNS:
            value = record.dedup_of if column == "dedup_of" else summary.get(column)
            cells.append(_cell(value))
        line = self._render(cells)
        if self._neutralise and (_NEXT_FORMULA.search(line) or _FIRST_FORMULA.match(line)):
            # Rare, and the search may also hit inside a quoted cell: decide cell by cell.
            cells = [
                "'" + cell if cell.__class__ is str and cell.startswith(FORMULA_STARTS) else cell
                for cell in cells
            ]
            line = self._render(cells)
        if "\r" in line:
            # The csv module quotes only the characters of its line terminator ("\n"): a
            # bare carriage return would end the row for most readers.
            line = ",".join(map(_quote, cells)) + "\n"
        # result_json last, apart: it starts with "{" (never a formula, never neutralised),
        # and the searches above stay as short as the other cells whatever its size.
        result = "" if record.result is None else _quote(result_json)
        line = line[:-1] + "," + result + "\n"
        return line.encode("utf-8")


def csv_header() -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(CSV_COLUMNS)
    return buffer.getvalue().encode("utf-8")
