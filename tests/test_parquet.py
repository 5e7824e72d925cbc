"""Parquet exports of results.jsonl, checked with the README's DuckDB queries."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from rekbatch.errors import SetupError
from rekbatch.sinks.parquet import (
    EXAMPLE_QUERIES,
    FACE_COLUMNS,
    LABEL_COLUMNS,
    export_in_child,
    face_rows,
    parquet_schemas,
    write_parquet,
)
from rekbatch.sinks.rows import CSV_COLUMNS

BUCKET = "image-demo-lab"
RUN = "run-20261124"


def face_detail(
    left: float,
    *,
    age: tuple[int, int] = (30, 38),
    emotion: str = "HAPPY",
    smile: bool = True,
    glasses: bool = False,
    gender: str = "Male",
) -> dict[str, Any]:
    """A FaceDetail as DetectFaces returns it with Attributes=["ALL"]."""
    return {
        "BoundingBox": {"Width": 0.1, "Height": 0.2, "Left": left, "Top": 0.25},
        "AgeRange": {"Low": age[0], "High": age[1]},
        "Smile": {"Value": smile, "Confidence": 97.1},
        "Eyeglasses": {"Value": glasses, "Confidence": 99.0},
        "Sunglasses": {"Value": False, "Confidence": 99.9},
        "Gender": {"Value": gender, "Confidence": 99.5},
        "Beard": {"Value": False, "Confidence": 88.0},
        "Mustache": {"Value": False, "Confidence": 95.0},
        "EyesOpen": {"Value": True, "Confidence": 98.0},
        "MouthOpen": {"Value": False, "Confidence": 90.0},
        "Emotions": [
            {"Type": "CALM", "Confidence": 2.5},
            {"Type": emotion, "Confidence": 95.25},
            {"Type": "SURPRISED", "Confidence": 1.0},
        ],
        "Landmarks": [{"Type": "eyeLeft", "X": left + 0.03, "Y": 0.3}],
        "Pose": {"Roll": 1.0, "Yaw": -3.0, "Pitch": 2.0},
        "Quality": {"Brightness": 80.0, "Sharpness": 90.0},
        "Confidence": 99.99,
        "FaceOccluded": {"Value": False, "Confidence": 99.0},
        "EyeDirection": {"Yaw": 1.0, "Pitch": -2.0, "Confidence": 99.0},
    }


def compared_face(left: float) -> dict[str, Any]:
    return {
        "BoundingBox": {"Width": 0.1, "Height": 0.2, "Left": left, "Top": 0.3},
        "Confidence": 99.9,
        "Landmarks": [{"Type": "nose", "X": left + 0.05, "Y": 0.4}],
        "Pose": {"Roll": 0.0, "Yaw": 0.0, "Pitch": 0.0},
        "Quality": {"Brightness": 70.0, "Sharpness": 80.0},
        "Emotions": [{"Type": "CALM", "Confidence": 80.0}],
        "Smile": {"Value": False, "Confidence": 90.0},
    }


def compare_result(similarities: list[float], unmatched: int) -> dict[str, Any]:
    return {
        "SourceImageFace": {
            "BoundingBox": {"Width": 0.3, "Height": 0.4, "Left": 0.3, "Top": 0.2},
            "Confidence": 99.99,
        },
        "FaceMatches": [
            {"Similarity": s, "Face": compared_face(0.1 * i)} for i, s in enumerate(similarities)
        ],
        "UnmatchedFaces": [compared_face(0.5 + 0.1 * i) for i in range(unmatched)],
    }


def label(
    name: str, confidence: float, *, parents: list[str], categories: list[str], instances: int
) -> dict[str, Any]:
    return {
        "Name": name,
        "Confidence": confidence,
        "Instances": [
            {
                "BoundingBox": {"Width": 0.1, "Height": 0.3, "Left": 0.1 * i, "Top": 0.2},
                "Confidence": 90.0,
            }
            for i in range(instances)
        ],
        "Parents": [{"Name": p} for p in parents],
        "Aliases": [],
        "Categories": [{"Name": c} for c in categories],
    }


PERSON = label("Person", 99.5, parents=[], categories=["Person Description"], instances=1)
ADULT = label("Adult", 98.0, parents=["Person"], categories=["Person Description"], instances=1)


def row(
    key: str,
    operation: str,
    status: str = "ok",
    result: dict[str, Any] | None = None,
    *,
    bucket: str | None = BUCKET,
    **fields: Any,
) -> dict[str, Any]:
    base: dict[str, Any] = {
        "run_id": RUN,
        "bucket": bucket,
        "key": key,
        "etag": f'"etag-{key}"',
        "size": 123_456,
        "last_modified": "2026-11-20T08:00:00.000Z",
        "operation": operation,
        "status": status,
        "reason": None,
        "error_code": None,
        "error_message": None,
        "attempts": 1 if status != "skipped" else 0,
        "latency_ms": 180.5 if status != "skipped" else None,
        "processed_at": "2026-11-24T21:40:06.123Z",
        "result": result,
    }
    base.update(fields)
    return base


def sample_rows() -> list[dict[str, Any]]:
    crowd = [face_detail(0.05 + 0.15 * i) for i in range(5)]
    crowd[2] = face_detail(
        0.35, age=(22, 30), emotion="SAD", smile=False, glasses=True, gender="Female"
    )
    return [
        row("crowd.jpg", "detect_faces", result={"FaceDetails": crowd}),
        row("ric.jpg", "detect_faces", result={"FaceDetails": [face_detail(0.4)]}),
        row(
            "group.jpg",
            "detect_faces",
            result={"FaceDetails": [face_detail(0.1 + 0.2 * i) for i in range(4)]},
        ),
        row("empty.jpg", "detect_faces", result={"FaceDetails": []}),
        row(
            "broken.jpg",
            "detect_faces",
            "failed",
            attempts=3,
            error_code="InvalidImageFormatException",
            error_message="Request has invalid image format",
        ),
        row("notes.txt", "detect_faces", "skipped", reason="not_image"),
        row(
            "crowd.jpg",
            "detect_labels",
            result={
                "Labels": [
                    label(
                        "Person", 99.8, parents=[], categories=["Person Description"], instances=5
                    ),
                    label(
                        "Crowd",
                        97.0,
                        parents=["Person"],
                        categories=["Person Description"],
                        instances=0,
                    ),
                    ADULT,
                ],
                "LabelModelVersion": "3.0",
            },
        ),
        row(
            "ric.jpg",
            "detect_labels",
            result={
                "Labels": [
                    PERSON,
                    label(
                        "Face",
                        96.0,
                        parents=["Person", "Head"],
                        categories=["Person Description"],
                        instances=0,
                    ),
                ],
                "LabelModelVersion": "3.0",
            },
        ),
        row("group.jpg", "detect_labels", result={"Labels": [PERSON, ADULT]}),
        row("notes.txt", "detect_labels", "skipped", reason="not_image"),
        row("photos/a.jpg", "detect_labels", bucket=None, result={"Labels": [PERSON]}),
        row("crowd.jpg", "compare_faces", result=compare_result([99.1], 4)),
        row("ric.jpg", "compare_faces", result=compare_result([99.9], 0)),
        row("group.jpg", "compare_faces", result=compare_result([], 4)),
        row(
            "empty.jpg",
            "compare_faces",
            "failed",
            attempts=1,
            error_code="InvalidParameterException",
            error_message="Request has invalid parameters",
        ),
        row("notes.txt", "compare_faces", "skipped", reason="not_image"),
    ]


def write_jsonl(output_dir: Path, rows: list[dict[str, Any]], tail: bytes = b"") -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = b"".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in rows
    )
    path = output_dir / "results.jsonl"
    path.write_bytes(lines + tail)
    return path


def query(output_dir: Path, name: str) -> list[tuple[Any, ...]]:
    connection = duckdb.connect()
    try:
        rows: list[tuple[Any, ...]] = connection.execute(
            EXAMPLE_QUERIES[name].format(dir=output_dir.as_posix())
        ).fetchall()
    finally:
        connection.close()
    return rows


@pytest.fixture
def out(tmp_path: Path) -> Path:
    output_dir = tmp_path / "out"
    write_jsonl(output_dir, sample_rows())
    written = write_parquet(output_dir, batch_rows=3)  # several batches, several row groups
    assert [p.name for p in written] == ["results.parquet", "faces.parquet", "labels.parquet"]
    assert not list(output_dir.glob("*.tmp"))
    return output_dir


def test_example_queries_answer_the_readme_questions(out: Path) -> None:
    assert query(out, "top_labels") == [("Person", 4), ("Adult", 2), ("Crowd", 1), ("Face", 1)]
    assert query(out, "crowded_images") == [(BUCKET, "crowd.jpg", 5), (BUCKET, "group.jpg", 4)]
    assert query(out, "reference_matched") == [
        (BUCKET, "ric.jpg", 99.9),
        (BUCKET, "crowd.jpg", 99.1),
    ]


def test_schemas_are_fixed(out: Path) -> None:
    schemas = parquet_schemas()
    for name, schema in schemas.items():
        assert pq.read_schema(out / name).equals(schema), name
    assert schemas["results.parquet"].names == list(CSV_COLUMNS)
    assert schemas["faces.parquet"].names == list(FACE_COLUMNS)
    assert schemas["labels.parquet"].names == list(LABEL_COLUMNS)
    types = {f.name: str(f.type) for f in schemas["results.parquet"]}
    assert types["size"] == "int64"
    assert types["latency_ms"] == "double"
    assert types["matched"] == "bool"
    assert types["processed_at"] == types["last_modified"] == "timestamp[ms, tz=UTC]"
    assert str(schemas["labels.parquet"].field("parents").type) == "list<item: string>"


def test_results_rows_are_typed_and_summarised(out: Path) -> None:
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == len(sample_rows())
    by = {(r["key"], r["operation"]): r for r in rows}
    crowd = by[("crowd.jpg", "detect_faces")]
    assert crowd["face_count"] == 5 and crowd["status"] == "ok" and crowd["size"] == 123_456
    assert crowd["processed_at"] == datetime(2026, 11, 24, 21, 40, 6, 123_000, tzinfo=UTC)
    assert crowd["last_modified"] == datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
    assert json.loads(crowd["result_json"])["FaceDetails"][2]["Gender"]["Value"] == "Female"
    assert by[("crowd.jpg", "detect_labels")]["labels"] == "Person;Crowd;Adult"
    compare = by[("group.jpg", "compare_faces")]
    assert compare["matched"] is False and compare["best_similarity"] is None
    assert compare["face_count"] == 4
    assert by[("ric.jpg", "compare_faces")]["match_box"] == "0.0000,0.3000,0.1000,0.2000"
    failed = by[("broken.jpg", "detect_faces")]
    assert failed["error_code"] == "InvalidImageFormatException" and failed["attempts"] == 3
    assert failed["face_count"] is None and failed["result_json"] is None
    skipped = by[("notes.txt", "compare_faces")]
    assert skipped["reason"] == "not_image" and skipped["matched"] is None
    assert skipped["latency_ms"] is None
    assert by[("photos/a.jpg", "detect_labels")]["bucket"] is None


def test_index_faces_rows_name_every_face_and_why_some_were_left_out() -> None:
    box = {"Left": 0.1, "Top": 0.2, "Width": 0.3, "Height": 0.4}
    result = {
        "CollectionId": "people-0001",
        "FaceRecords": [
            {"Face": {"FaceId": "f-1", "BoundingBox": box, "ExternalImageId": "x"}},
            {"Face": {"FaceId": "f-2", "BoundingBox": box}, "FaceDetail": {"Confidence": 99}},
        ],
        "UnindexedFaces": [{"Reasons": ["LOW_SHARPNESS", "SMALL_BOUNDING_BOX"]}],
    }
    row = {"bucket": "b", "key": "k.jpg", "etag": "e", "operation": "index_faces"}
    faces = face_rows({**row, "status": "ok", "result": result})
    assert [(f["face_id"], f["indexed"], f["face_index"]) for f in faces] == [
        ("f-1", True, 0),
        ("f-2", True, 1),
        (None, False, 2),
    ]
    assert {f["collection_id"] for f in faces} == {"people-0001"}
    assert faces[0]["bbox_width"] == faces[1]["bbox_width"] == 0.3
    assert faces[1]["confidence"] == 99.0
    assert faces[2]["unindexed_reasons"] == "LOW_SHARPNESS;SMALL_BOUNDING_BOX"
    assert {f["source_operation"] for f in faces} == {"IndexFaces"}


def test_faces_rows(out: Path) -> None:
    faces = pq.read_table(out / "faces.parquet").to_pylist()
    detected = [f for f in faces if f["operation"] == "detect_faces"]
    compared = [f for f in faces if f["operation"] == "compare_faces"]
    assert len(detected) == 5 + 1 + 4 and len(compared) == 5 + 1 + 4
    assert {f["source_operation"] for f in detected} == {"DetectFaces"}
    assert {f["source_operation"] for f in compared} == {"CompareFaces"}
    third = next(f for f in detected if f["key"] == "crowd.jpg" and f["face_index"] == 2)
    assert third == {
        "bucket": BUCKET,
        "key": "crowd.jpg",
        "etag": '"etag-crowd.jpg"',
        "operation": "detect_faces",
        "source_operation": "DetectFaces",
        "face_index": 2,
        "bbox_left": 0.35,
        "bbox_top": 0.25,
        "bbox_width": 0.1,
        "bbox_height": 0.2,
        "confidence": 99.99,
        "age_low": 22,
        "age_high": 30,
        "emotion_top": "SAD",
        "emotion_top_confidence": 95.25,
        "smile": False,
        "eyeglasses": True,
        "gender": "Female",
        "similarity": None,
        "matched": None,
        "face_id": None,
        "collection_id": None,
        "indexed": None,
        "unindexed_reasons": None,
    }
    crowd_compare = [f for f in compared if f["key"] == "crowd.jpg"]
    assert [f["face_index"] for f in crowd_compare] == [0, 1, 2, 3, 4]
    assert [f["matched"] for f in crowd_compare] == [True, False, False, False, False]
    assert crowd_compare[0]["similarity"] == 99.1 and crowd_compare[1]["similarity"] is None
    assert crowd_compare[0]["age_low"] is None and crowd_compare[0]["emotion_top"] == "CALM"


def test_labels_rows(out: Path) -> None:
    labels = pq.read_table(out / "labels.parquet").to_pylist()
    assert len(labels) == 3 + 2 + 2 + 1
    face = next(lab for lab in labels if lab["name"] == "Face")
    assert face == {
        "bucket": BUCKET,
        "key": "ric.jpg",
        "etag": '"etag-ric.jpg"',
        "name": "Face",
        "confidence": 96.0,
        "parents": ["Person", "Head"],
        "categories": ["Person Description"],
        "instance_count": 0,
    }
    crowd_person = next(
        lab for lab in labels if lab["key"] == "crowd.jpg" and lab["name"] == "Person"
    )
    assert crowd_person["instance_count"] == 5 and crowd_person["parents"] == []


def test_no_rows_gives_empty_files_with_the_schema(tmp_path: Path) -> None:
    write_jsonl(tmp_path, [])
    schemas = parquet_schemas()
    for path in write_parquet(tmp_path):
        table = pq.read_table(path)
        assert table.num_rows == 0
        assert table.schema.equals(schemas[path.name])
    assert query(tmp_path, "top_labels") == []
    assert query(tmp_path, "crowded_images") == []
    assert query(tmp_path, "reference_matched") == []


def test_only_skipped_rows_give_empty_faces_and_labels(tmp_path: Path) -> None:
    write_jsonl(tmp_path, [row("notes.txt", "detect_faces", "skipped", reason="not_image")])
    write_parquet(tmp_path)
    assert pq.read_table(tmp_path / "results.parquet").num_rows == 1
    assert pq.read_table(tmp_path / "faces.parquet").num_rows == 0
    assert pq.read_table(tmp_path / "labels.parquet").num_rows == 0


def test_a_torn_last_line_is_left_out(tmp_path: Path) -> None:
    write_jsonl(tmp_path, sample_rows()[:2], tail=b'{"run_id":"run-2026112')
    write_parquet(tmp_path)
    assert pq.read_table(tmp_path / "results.parquet").num_rows == 2


def test_a_bad_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, sample_rows()[:1])
    path.write_bytes(b"not json\n" + path.read_bytes())
    with pytest.raises(ValueError, match=r"results\.jsonl:1"):
        write_parquet(tmp_path)
    assert not list(tmp_path.glob("*.parquet*"))


def test_pipeline_extras_fill_their_columns(tmp_path: Path) -> None:
    extra = row(
        "x.jpg", "search_faces", result={"people": ["ric"]}, people="ric;andrew", dedup_of="y.jpg"
    )
    write_jsonl(tmp_path, [extra])
    write_parquet(tmp_path)
    (written,) = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert written["people"] == "ric;andrew" and written["dedup_of"] == "y.jpg"


def test_missing_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path, [])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SetupError, match=r"pip install 'rekbatch\[parquet\]'"):
        write_parquet(tmp_path)


async def test_the_export_in_its_own_process_writes_the_same_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path, sample_rows())
    written = await export_in_child(tmp_path)
    assert sorted(p.name for p in written) == ["faces.parquet", "labels.parquet", "results.parquet"]
    assert pq.read_table(tmp_path / "results.parquet").num_rows == len(sample_rows())
    assert not list(tmp_path.glob("*.tmp"))


async def test_a_failed_export_in_its_process_names_the_directory_and_the_cause(
    tmp_path: Path,
) -> None:
    path = write_jsonl(tmp_path, sample_rows()[:1])
    path.write_bytes(b"not json\n" + path.read_bytes())
    with pytest.raises(SetupError, match=r"Parquet export of .*: error: .*results\.jsonl:1"):
        await export_in_child(tmp_path)
    assert not list(tmp_path.glob("*.parquet*"))
