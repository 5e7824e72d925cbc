"""Pure pieces: filters, sniffing, watermark, result flattening, row rendering."""

from __future__ import annotations

import csv
import io
import json

import pytest

from rekbatch.operations.summaries import compare_summary
from rekbatch.records import ObjectRef, Record
from rekbatch.sinks.rows import CSV_COLUMNS, CsvRows, csv_header, encode_result, jsonl_line
from rekbatch.sources.filters import (
    MAX_IMAGE_BYTES,
    MAX_S3_OBJECT_BYTES,
    classify_listing,
    sniff_kind,
)
from rekbatch.store.watermark import WatermarkTracker
from tests.helpers import fake_jpeg, tiny_png

INCLUDE = ["*.jpg", "*.jpeg", "*.png"]


def obj(key: str, size: int = 1000) -> ObjectRef:
    return ObjectRef("bkt", key, size, "etag", "2026-01-01T00:00:00Z")


@pytest.mark.parametrize(
    ("key", "size", "limit", "reason"),
    [
        ("a/b/photo.jpg", 1000, MAX_S3_OBJECT_BYTES, None),
        ("a/b/PHOTO.JPEG", 1000, MAX_S3_OBJECT_BYTES, None),
        ("x.png", 1000, MAX_S3_OBJECT_BYTES, None),
        ("notes.txt", 1000, MAX_S3_OBJECT_BYTES, "excluded"),
        ("empty.jpg", 0, MAX_S3_OBJECT_BYTES, "empty"),
        ("tiny.jpg", 10, MAX_S3_OBJECT_BYTES, "too_small"),  # without sniffing
        ("big.jpg", MAX_S3_OBJECT_BYTES + 1, MAX_S3_OBJECT_BYTES, "too_large"),
        ("six-mb.jpg", 6 * 1024 * 1024, MAX_S3_OBJECT_BYTES, None),
        ("six-mb.jpg", 6 * 1024 * 1024, MAX_IMAGE_BYTES, "too_large"),
        ("skip/me.jpg", 1000, MAX_S3_OBJECT_BYTES, "excluded"),
    ],
)
def test_classify_listing(key: str, size: int, limit: int, reason: str | None) -> None:
    assert classify_listing(obj(key, size), INCLUDE, ["skip/*"], limit) == reason


def test_sniff_kind() -> None:
    assert sniff_kind(fake_jpeg(1)[:16]) == "jpeg"
    assert sniff_kind(tiny_png(1)[:16]) == "png"
    assert sniff_kind(b"just some text named .jpg") is None
    assert sniff_kind(b"") is None
    assert sniff_kind(b"GIF89a") is None


def test_watermark_moves_over_the_finished_prefix_only() -> None:
    tracker = WatermarkTracker(None)
    seqs = [tracker.push(k) for k in ("a", "b", "c", "d")]
    tracker.complete(seqs[1])
    assert tracker.mark is None
    tracker.complete(seqs[0])
    assert tracker.mark == "b"
    tracker.complete(seqs[3])
    assert tracker.mark == "b"
    tracker.complete(seqs[2])
    assert tracker.mark == "d"
    assert tracker.outstanding == 0


def test_compare_summary_picks_the_best_match() -> None:
    result = {
        "FaceMatches": [
            {
                "Similarity": 91.5,
                "Face": {"BoundingBox": {"Left": 0.1, "Top": 0.2, "Width": 0.3, "Height": 0.4}},
            },
            {
                "Similarity": 99.25,
                "Face": {"BoundingBox": {"Left": 0.5, "Top": 0.5, "Width": 0.1, "Height": 0.1}},
            },
        ],
        "UnmatchedFaces": [{}, {}],
    }
    summary = compare_summary(result)
    assert summary == {
        "face_count": 4,
        "best_similarity": 99.25,
        "matched": True,
        "match_box": "0.5000,0.5000,0.1000,0.1000",
    }
    assert compare_summary({"FaceMatches": [], "UnmatchedFaces": []})["matched"] is False


def test_rows_render_awkward_keys_losslessly() -> None:
    key = 'dir/with space/ünïcødé+%2F"quote",comma\nnewline.jpg'
    record = Record(
        obj=obj(key),
        operation="compare_faces",
        status="ok",
        attempts=1,
        processed_at="2026-01-01T00:00:00Z",
        result={"FaceMatches": []},
    )
    result_json = encode_result(record.result)
    line = jsonl_line(record, "r1", "s3://b/", result_json)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = json.loads(line)
    assert parsed["key"] == key and parsed["source"] == "s3://b/" and parsed["run_id"] == "r1"
    assert parsed["result"] == {"FaceMatches": []}
    summary = {"matched": False, "face_count": 0}
    text = (csv_header() + CsvRows().row(record, "r1", "s3://b/", summary, result_json)).decode()
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 1
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert rows[0]["key"] == key
    assert rows[0]["matched"] == "false"
    assert json.loads(rows[0]["result_json"]) == {"FaceMatches": []}


def test_a_results_line_reads_back_into_the_record_that_wrote_it() -> None:
    """The writer replays results.jsonl (a crash's tail, merge) with ``parse_line``: what
    ``jsonl_line`` writes of the record itself comes back in its place, the rest as
    ``extra``."""
    from rekbatch.sinks.writer import parse_line

    item = ObjectRef("bkt", "a.jpg", 1000, "etag", "2026-01-01T00:00:00Z", sequencer="00AB")
    record = Record(
        item,
        "detect_labels",
        "ok",
        attempts=2,
        latency_ms=12.5,
        processed_at="2026-01-01T00:00:01Z",
        result={"Labels": []},
        dedup_of="s3://bkt/b.jpg",
        extra={"width": 640, "height": 480, "collection": "c1"},
    )
    line = jsonl_line(record, "run1", "s3://bkt/", encode_result(record.result))
    row = parse_line(line, 0, ["s3://bkt/"])
    assert row is not None
    back = row.record
    assert (back.obj.sequencer, back.dedup_of) == ("00AB", "s3://bkt/b.jpg")
    assert back.result == {"Labels": []}
    assert back.extra is not None and back.extra["collection"] == "c1"
    assert not {"sequencer", "dedup_of", "result", "run_id", "key"} & set(back.extra)
    assert jsonl_line(back, row.run_id, "s3://bkt/", row.result_json) == line
